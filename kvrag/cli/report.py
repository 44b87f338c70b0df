"""``kvrag report``: one table across compare runs (base model vs adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import console, fail


def report(
    runs: Annotated[list[Path], typer.Argument(
        help="compare output directories; the first is the baseline (e.g. the base model).")],
    systems: Annotated[str | None, typer.Option(
        help="Comma-separated systems to show (default: all that any run answered).")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the table to this file.")] = None,
    metric: Annotated[str, typer.Option(
        help="subem (gold inside the extracted answer), subem_output (gold anywhere in the "
             "output), em (exact) or f1.")] = "subem",
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Compare runs of one dataset, e.g. the base model and its adapters, system by system.

    Each system is scored on the questions every run answered for it, per task, with a
    paired Δ against the first run and each model's relative change from its own full
    cache under compression or RAG. SubEM credits any answer that contains the gold one,
    so a verbose model can outscore a terse one; compare with --metric em.
    """
    from kvrag.evaluation.across_runs import compare_runs, load_runs, render_markdown

    try:
        loaded = load_runs(runs)
        table = compare_runs(loaded, systems.split(",") if systems else None, seed, metric)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    text = render_markdown(table)
    if out is not None:
        out.write_text(text)
    console.print(text, markup=False, highlight=False)
