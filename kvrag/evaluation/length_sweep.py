"""Accuracy against context length: the sub-runs of ``kvrag compare --context-tokens``.

Each sub-run answers the same questions with their prompts cut to one length (non-gold
documents dropped, last first). A system's curve uses only the questions it answered at
every length, each scored by its task's metric, so the points differ in length alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvrag.evaluation.across_runs import Run
from kvrag.evaluation.metrics import task_score
from kvrag.evaluation.report import bootstrap_ci, format_ci

PLOT_NAME = "accuracy_vs_length.png"


def is_sweep(runs: Sequence[Run]) -> bool:
    """True when the runs are sub-runs of one sweep at more than one length."""
    lengths = [run.config.get("context_tokens") for run in runs]
    return None not in lengths and len(set(lengths)) > 1


def sweep_table(runs: Sequence[Run], seed: int = 0) -> dict:
    """Per system and length: n, task score with 95% CI, mean prompt tokens."""
    by_length = sorted(runs, key=lambda run: run.config["context_tokens"])
    names = list(dict.fromkeys(s for run in by_length for s in run.by_system))
    systems: dict[str, dict[int, dict]] = {}
    for name in names:
        holders = [run for run in by_length if name in run.by_system]
        ids = set.intersection(*(
            {q for q, r in run.by_system[name].items() if task_score(r) is not None}
            for run in holders))
        rows = {}
        for run in holders:
            recs = [run.by_system[name][q] for q in sorted(ids)]
            values = [task_score(r) for r in recs]
            rows[run.config["context_tokens"]] = {
                "n": len(values), "score": float(np.mean(values)) if values else None,
                "ci95": bootstrap_ci(values, seed),
                "prompt_tokens_mean": float(np.mean([r["cost"]["prompt_tokens"] for r in recs]))
                if recs else None,
            }
        systems[name] = rows
    return {"lengths": [run.config["context_tokens"] for run in by_length],
            "model": by_length[0].label, "systems": systems}


def render_markdown(table: dict) -> str:
    lengths = table["lengths"]
    lines = ["Task score in % by context length (prompt tokens, chat template included), "
             "95% CI (n); every length answers the same questions.", "",
             "| system | " + " | ".join(f"{n:,}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, rows in table["systems"].items():
        cells = []
        for n in lengths:
            row = rows.get(n)
            cells.append("–" if row is None or row["score"] is None else
                         f"{100 * row['score']:.1f} {format_ci(row['ci95'])} ({row['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_length(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, rows in table["systems"].items():
        points = [(n, row) for n, row in sorted(rows.items()) if row["score"] is not None]
        if not points:
            continue
        x = [n for n, _ in points]
        y = np.array([100 * row["score"] for _, row in points])
        lo = np.array([100 * row["ci95"][0] for _, row in points])
        hi = np.array([100 * row["ci95"][1] for _, row in points])
        line = ax.plot(x, y, marker="o", label=f"{name} (n={points[0][1]['n']})")[0]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(table["lengths"], [f"{n:,}" for n in table["lengths"]])
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("task score (%)")
    ax.set_title(f"{table['model']}: accuracy vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_sweep(runs: Sequence[Run], plot: Path, seed: int = 0) -> str:
    """The plot at ``plot`` and sweep.md beside it; returns the table's markdown."""
    table = sweep_table(runs, seed)
    text = render_markdown(table)
    (plot.parent / "sweep.md").write_text(text)
    plot_accuracy_vs_length(table, plot)
    return text
