"""One table across several ``kvrag compare`` runs: base model vs adapters, per system.

Each run directory is one model (the base, or the base plus an adapter) answering a system
matrix. Runs are compared only on the questions every run answered for that system, and
differences are paired per question against the first run (the baseline). Under a
compressed system, ``drop`` is the model's relative loss against its own ``full``:
(full − system) / full on the same questions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrag.evaluation.report import bootstrap_ci


@dataclass(frozen=True)
class Run:
    label: str
    records: dict[tuple[str, str], dict]  # (question id, system) -> record


def load_run(path: Path) -> Run:
    """A compare output directory; labelled by its adapter's folder name, else its model."""
    config_path, results = path / "run.json", path / "results.jsonl"
    if not config_path.is_file() or not results.is_file():
        raise FileNotFoundError(f"{path} is not a kvrag compare output (needs run.json and "
                                "results.jsonl)")
    config = json.loads(config_path.read_text())
    label = Path(config["adapter"]).name if config.get("adapter") else config["model"]
    records = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            records[(r["id"], r["system"])] = r
    return Run(label, records)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """``load_run`` of each; labels that clash get their directory name appended."""
    runs = [load_run(path) for path in paths]
    labels = [run.label for run in runs]
    return [Run(f"{run.label} ({path.name})", run.records) if labels.count(run.label) > 1
            else run for run, path in zip(runs, paths, strict=True)]


def _systems(run: Run) -> list[str]:
    return list(dict.fromkeys(system for _, system in run.records))


def compare_runs(runs: Sequence[Run], systems: Sequence[str] | None = None,
                 seed: int = 0) -> dict:
    """Per system and run: n, SubEM with CI, SubEM per task, Δ vs the first run, drop.

    ``systems`` defaults to every system any run answered; a run without one is left out
    of that system's rows, and Δ is then paired against the first run that has it.
    """
    if not runs:
        raise ValueError("no runs to compare")
    names = list(systems) if systems else list(dict.fromkeys(
        s for run in runs for s in _systems(run)))
    table: dict = {"baseline": runs[0].label, "systems": {}}
    for system in names:
        holders = [r for r in runs if any(s == system for _, s in r.records)]
        if not holders:
            raise ValueError(f"no run answered system {system!r}")
        ids = sorted(set.intersection(*({q for q, s in r.records if s == system}
                                         for r in holders)))
        rows = {}
        for run in holders:
            recs = [run.records[(q, system)] for q in ids]
            subem = [r["scores"]["subem"] for r in recs]
            row = {"n": len(ids), "subem": float(np.mean(subem)) if ids else None,
                   "ci95": bootstrap_ci(subem, seed), "by_group": {}}
            for group in sorted({r["group"] for r in recs}):
                values = [r["scores"]["subem"] for r in recs if r["group"] == group]
                row["by_group"][group] = {"n": len(values), "subem": float(np.mean(values))}
            if run is not holders[0]:
                diffs = [a["scores"]["subem"] - holders[0].records[(q, system)]["scores"]["subem"]
                         for q, a in zip(ids, recs, strict=True)]
                row["vs_baseline"] = {"delta": float(np.mean(diffs)),
                                      "ci95": bootstrap_ci(diffs, seed)}
            full = [run.records.get((q, "full")) for q in ids]
            if system != "full" and all(full) and ids:
                base = float(np.mean([f["scores"]["subem"] for f in full]))
                row["drop"] = (base - row["subem"]) / base if base > 0 else None
            rows[run.label] = row
        table["systems"][system] = rows
    return table


def render_markdown(table: dict) -> str:
    groups = sorted({g for rows in table["systems"].values() for row in rows.values()
                     for g in row["by_group"]})
    lines = [f"SubEM in % (multiple choice: accuracy); Δ is paired against "
             f"`{table['baseline']}` on the same questions; drop is relative to the same "
             "model's `full`.", "",
             "| system | model | n | " + " | ".join(groups)
             + " | SubEM [95% CI] | Δ vs baseline [95% CI] | drop vs own full |",
             "|---|---|---|" + "---|" * len(groups) + "---|---|---|"]
    for system, rows in table["systems"].items():
        for label, row in rows.items():
            cells = [f"{100 * row['by_group'][g]['subem']:.1f}" if g in row["by_group"]
                     else "–" for g in groups]
            ci = row["ci95"]
            delta = row.get("vs_baseline")
            delta_txt = (f"{100 * delta['delta']:+.1f} [{100 * delta['ci95'][0]:+.1f}, "
                         f"{100 * delta['ci95'][1]:+.1f}]") if delta else "–"
            drop = row.get("drop")
            drop_txt = f"{100 * drop:.0f}%" if drop is not None else "–"
            subem = "–" if row["subem"] is None else (
                f"{100 * row['subem']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")
            lines.append(f"| {system} | {label} | {row['n']} | " + " | ".join(cells)
                         + f" | {subem} | {delta_txt} | {drop_txt} |")
    return "\n".join(lines) + "\n"
