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
        help="task (each task's own metric: SubEM for QA, accuracy for multiple choice, "
             "ROUGE-L for summaries), subem (gold inside the extracted answer), subem_output "
             "(gold anywhere in the output), em (exact) or f1.")] = "task",
    plot: Annotated[Path | None, typer.Option(help=(
        "Runs of one length sweep (compare --context-tokens): where to draw accuracy "
        "against length (default: accuracy_vs_length.png beside the first run)."))] = None,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    reference: Annotated[str, typer.Option(help=(
        "The system each other system of a run is paired against, e.g. snapkv:0.5 to see "
        "what snapkv[chunk=16]:0.5 changes."))] = "full",
) -> None:
    """Compare runs of one dataset, such as the base model and its adapters, system by system.

    Each system is scored on the questions every run answered for it, per task, with a
    paired Δ against the first run and, within each run, a paired Δ against its own
    reference system (--reference, full by default) and how often the answer is the same.
    SubEM credits any answer that contains the gold one, so a verbose model can outscore a
    terse one; compare with --metric em.
    """
    from kvrag.evaluation.across_runs import compare_runs, load_run, load_runs, render_markdown
    from kvrag.evaluation.length_sweep import PLOT_NAME, is_sweep, write_sweep

    try:
        swept = [load_run(path) for path in runs]
    except FileNotFoundError as e:
        fail(str(e))
    if is_sweep(swept):
        plot = plot or runs[0].parent / PLOT_NAME
        text = write_sweep(swept, plot, seed)
        if out is not None:
            out.write_text(text)
        console.print(text, markup=False, highlight=False)
        console.print(f"Accuracy against length drawn in {plot}")
        return
    from kvrag.compression.spec import split_specs

    try:
        loaded = load_runs(runs)
        table = compare_runs(loaded, split_specs(systems) if systems else None, seed, metric,
                             reference)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    text = render_markdown(table)
    if out is not None:
        out.write_text(text)
    console.print(text, markup=False, highlight=False)
