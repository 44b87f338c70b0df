"""One table across several ``kvrag compare`` runs: base model vs adapters, per system.

Each run directory is one model (the base, or the base plus an adapter) answering a system
matrix. Runs are compared only on the questions every run answered for that system, and
differences are paired per question against the first run (the baseline). Each system is
also set against a reference system of the same run (``full`` unless chosen, e.g.
``snapkv:0.5`` to see what a selection variant changes): ``vs_reference`` is the paired
difference with its CI, ``vs_own_reference`` the relative change (system − reference) /
reference, negative for a drop, and ``same_as_reference`` how often the extracted answer
is the reference's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrag.evaluation.metrics import task_score
from kvrag.evaluation.report import bootstrap_ci, format_ci
from kvrag.evaluation.store import read_results


@dataclass(frozen=True)
class Run:
    label: str
    by_system: dict[str, dict[str, dict]]  # system -> question id -> record
    config: dict  # the run's run.json


def load_run(path: Path) -> Run:
    """A compare output directory; labelled by its adapter's folder name, else its model.

    A run still writing is read as far as its last complete line.
    """
    config_path, results = path / "run.json", path / "results.jsonl"
    if not config_path.is_file() or not results.is_file():
        raise FileNotFoundError(f"{path} is not a kvrag compare output (needs run.json and "
                                "results.jsonl)")
    config = json.loads(config_path.read_text())
    label = Path(config["adapter"]).name if config.get("adapter") else config["model"]
    by_system: dict[str, dict[str, dict]] = {}
    for record in read_results(results):
        by_system.setdefault(record["system"], {})[record["id"]] = record
    return Run(label, by_system, config)


# What must match for two runs' answers to be paired question by question.
PAIRED_SETTINGS = ("dataset_sha256", "max_new_tokens", "prompt_version", "scoring_version")


def _short(value: object) -> str:
    return repr(value[:12] if isinstance(value, str) and len(value) == 64 else value)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """``load_run`` of each; labels that clash get their directory name appended.

    Answers are paired by question id, so runs that differ in data (dataset fingerprint),
    token limit, prompt template or scoring rule are refused.
    """
    runs = [load_run(path) for path in paths]
    first = runs[0].config
    for run, path in zip(runs[1:], paths[1:], strict=True):
        diffs = [f"{key} {_short(first.get(key))} vs {_short(run.config.get(key))}"
                 for key in PAIRED_SETTINGS if first.get(key) != run.config.get(key)]
        if diffs:
            raise ValueError(
                f"{paths[0]} (dataset {first.get('dataset')!r}) and {path} (dataset "
                f"{run.config.get('dataset')!r}) differ in {', '.join(diffs)}; report pairs "
                "answers question by question, so it compares only runs of one dataset, "
                "token limit, prompt and scoring")
    labels = [run.label for run in runs]
    return [Run(f"{run.label} ({path.name})", run.by_system, run.config)
            if labels.count(run.label) > 1 else run
            for run, path in zip(runs, paths, strict=True)]


METRICS = ("task", "subem", "subem_output", "em", "f1")


def _value(record: dict, metric: str) -> float | None:
    """``task``: the record's task metric (SubEM, accuracy, ROUGE-L); else that score."""
    return task_score(record) if metric == "task" else record["scores"].get(metric)


def _normalized(answer: str) -> str:
    return " ".join(answer.lower().split())


def compare_runs(runs: Sequence[Run], systems: Sequence[str] | None = None,
                 seed: int = 0, metric: str = "subem", reference: str = "full") -> dict:
    """Per system and run: n, the metric with CI and per task, Δ vs the first run, the
    paired Δ and relative change against the run's own ``reference`` system, and how often
    the extracted answer is the one ``reference`` gave (``same_as_reference``: robustness
    that accuracy near the floor hides).

    ``systems`` defaults to every system any run answered; a run without one is left out
    of that system's rows, and Δ is then paired against the first run that has it.
    """
    if not runs:
        raise ValueError("no runs to compare")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    names = list(systems) if systems else list(dict.fromkeys(
        s for run in runs for s in run.by_system))
    table: dict = {"baseline": runs[0].label, "metric": metric, "reference": reference,
                   "systems": {}}
    for system in names:
        holders = [r for r in runs if system in r.by_system]
        if not holders:
            raise ValueError(f"no run answered system {system!r}")
        ids = sorted(set.intersection(*(set(r.by_system[system]) for r in holders)))
        baseline = holders[0].by_system[system]
        for run in holders:
            if metric != "task" and any(metric not in run.by_system[system][q]["scores"]
                                        for q in ids):
                raise ValueError(f"run {run.label!r} has no {metric} scores for {system} "
                                 "(made by an older kvrag); rerun it into a new directory")
        ids = [q for q in ids if all(_value(r.by_system[system][q], metric) is not None
                                     for r in holders)]  # e.g. a summary has no SubEM
        rows = {}
        for run in holders:
            recs = [run.by_system[system][q] for q in ids]
            values = [_value(r, metric) for r in recs]
            row = {"n": len(ids), "score": float(np.mean(values)) if ids else None,
                   "ci95": bootstrap_ci(values, seed), "by_group": {}}
            for group in sorted({r["group"] for r in recs}):
                in_group = [_value(r, metric) for r in recs if r["group"] == group]
                row["by_group"][group] = {"n": len(in_group), "score": float(np.mean(in_group)),
                                          "ci95": bootstrap_ci(in_group, seed)}
            if run is not holders[0]:
                diffs = [_value(a, metric) - _value(baseline[q], metric)
                         for q, a in zip(ids, recs, strict=True)]
                row["vs_baseline"] = {"delta": float(np.mean(diffs)),
                                      "ci95": bootstrap_ci(diffs, seed)}
            ref = [run.by_system.get(reference, {}).get(q) for q in ids]
            if system != reference and ids and all(ref):
                ref_values = [_value(f, metric) for f in ref]
                if None not in ref_values:
                    base = float(np.mean(ref_values))
                    diffs = [v - f for v, f in zip(values, ref_values, strict=True)]
                    row["vs_reference"] = {"delta": float(np.mean(diffs)),
                                           "ci95": bootstrap_ci(diffs, seed)}
                    row["vs_own_reference"] = (row["score"] - base) / base if base > 0 else None
                if all("answer" in r for r in recs + ref):
                    same = [float(_normalized(r["answer"]) == _normalized(f["answer"]))
                            for r, f in zip(recs, ref, strict=True)]
                    row["same_as_reference"] = {"rate": float(np.mean(same)),
                                                "ci95": bootstrap_ci(same, seed)}
            rows[run.label] = row
        table["systems"][system] = rows
    return table


def _delta_text(delta: dict | None) -> str:
    if not delta:
        return "–"
    return (f"{100 * delta['delta']:+.1f} [{100 * delta['ci95'][0]:+.1f}, "
            f"{100 * delta['ci95'][1]:+.1f}]")


def render_markdown(table: dict) -> str:
    groups = sorted({g for rows in table["systems"].values() for row in rows.values()
                     for g in row["by_group"]})
    name = {"task": "Task score", "subem": "SubEM", "subem_output": "SubEM of the whole output",
            "em": "EM", "f1": "F1"}[table["metric"]]
    ref = table["reference"]
    lines = [f"{name} in % (task score: SubEM for QA, accuracy for multiple choice, ROUGE-L "
             "for summaries; per task with its 95% CI); Δ vs baseline is paired against "
             f"`{table['baseline']}` on the same questions; Δ vs own `{ref}` is paired against "
             f"the same model's `{ref}`, followed by the relative change, and *same answer* is "
             f"how often the extracted answer equals the one `{ref}` gave.", "",
             "| system | model | n | " + " | ".join(groups)
             + f" | {name} [95% CI] | Δ vs baseline [95% CI] | Δ vs own {ref} [95% CI]"
             + " | same answer [95% CI] |",
             "|---|---|---|" + "---|" * len(groups) + "---|---|---|---|"]
    for system, rows in table["systems"].items():
        for label, row in rows.items():
            cells = [f"{100 * row['by_group'][g]['score']:.1f} "
                     f"{format_ci(row['by_group'][g].get('ci95'))}".rstrip()
                     if g in row["by_group"] else "–" for g in groups]
            ci = row["ci95"]
            change = row.get("vs_own_reference")
            change_txt = (_delta_text(row.get("vs_reference"))
                          + (f" ({100 * change:+.0f}%)" if change is not None else ""))
            same = row.get("same_as_reference")
            same_txt = (f"{100 * same['rate']:.0f}% [{100 * same['ci95'][0]:.0f}, "
                        f"{100 * same['ci95'][1]:.0f}]") if same else "–"
            score = "–" if row["score"] is None else (
                f"{100 * row['score']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")
            lines.append(f"| {system} | {label} | {row['n']} | " + " | ".join(cells)
                         + f" | {score} | {_delta_text(row.get('vs_baseline'))} | {change_txt} "
                         f"| {same_txt} |")
    return "\n".join(lines) + "\n"
