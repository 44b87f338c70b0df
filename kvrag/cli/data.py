"""``kvrag data``: make the demo suite, check a dataset file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import console, fail
from kvrag.data.demo import DEMO_CONTEXT_TOKENS, DEMO_PER_TASK, DEMO_SEED, make_demo
from kvrag.data.loaders import LOADERS, load_dataset
from kvrag.data.schema import DatasetError, write_jsonl

app = typer.Typer(help="Make and check datasets.", no_args_is_help=True)


@app.command("make-demo")
def make_demo_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the JSONL file.")],
    seed: Annotated[int, typer.Option(help="Random seed; the shipped suite uses 0.")] = DEMO_SEED,
    context_tokens: Annotated[
        int, typer.Option(help="Approximate document tokens per question.")
    ] = DEMO_CONTEXT_TOKENS,
    per_task: Annotated[int, typer.Option(help="Questions per task family.")] = DEMO_PER_TASK,
    questions_per_corpus: Annotated[int, typer.Option(help=(
        "Questions asked over each corpus (the shipped demo-shared suite uses 8); above 1, "
        "a corpus of about --context-tokens holds every one of its questions' documents, "
        "and its questions mix the task families."))] = 1,
) -> None:
    """Generate the demo suite (four task families over invented facts) reproducibly."""
    try:
        instances = make_demo(seed=seed, context_tokens=context_tokens, per_task=per_task,
                              questions_per_corpus=questions_per_corpus)
    except ValueError as e:
        fail(str(e))
    write_jsonl(instances, out)
    console.print(f"Wrote {len(instances)} instances to {out}")


@app.command("check")
def check_cmd(
    dataset: Annotated[str, typer.Argument(help="A .jsonl path, 'demo' or 'demo-shared'.")],
    fmt: Annotated[
        str, typer.Option("--format", help=f"One of auto, {', '.join(sorted(LOADERS))}.")
    ] = "auto",
) -> None:
    """Validate a dataset file and print what it holds."""
    try:
        instances = load_dataset(dataset, fmt)
    except DatasetError as e:
        fail(str(e))
    groups = Counter(i.group for i in instances)
    corpora = len({i.corpus_id for i in instances})
    console.print(f"{dataset}: {len(instances)} valid instances over {corpora} corpora; "
                  + ", ".join(f"{g}: {n}" for g, n in sorted(groups.items())))
