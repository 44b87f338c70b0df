"""Console and error helpers shared by the command groups."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kvrag.extras import MissingExtraError, require
from kvrag.rag_stack.ingest_rate import IngestCounter

# The names are listed here, not imported from kvrag.engines.device, so that `--help`
# does not import torch.
DeviceOption = Annotated[str, typer.Option(help=(
    "Where the model runs: auto, cpu, cuda, cuda:N; auto is the first CUDA device if one "
    "is visible, else the CPU."))]
DtypeOption = Annotated[str, typer.Option(help=(
    "Model (and KV-cache) precision: auto, float32, bfloat16, float16; auto is bfloat16 on "
    "a CUDA device that supports it, float32 on a CPU."))]
JudgeApiKeyOption = Annotated[str | None, typer.Option(
    envvar="KVRAG_JUDGE_API_KEY",
    help="The judge server's API key (its --api-key), sent as Authorization: Bearer KEY.")]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error line and exit non-zero."""
    report_error(message)
    raise typer.Exit(code)


def report_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def need(part: str, feature: str) -> None:
    """Exit with the pip command to run when ``feature`` needs an extra not installed."""
    try:
        require(part, feature)
    except MissingExtraError as e:
        fail(str(e))


class StepProgress:
    """Progress of a long job with one live metric.

    On a terminal it is a Rich bar; elsewhere (nohup, CI logs) Rich would print nothing
    until the end, so each update is logged as a plain line instead.
    """

    def __init__(self, description: str, total: int, metric: str) -> None:
        self.metric = metric
        self.total = total
        self.done = 0
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(f"{metric} {{task.fields[value]}}"), TimeRemainingColumn())
        self._bar = Progress(*columns, console=console, disable=not console.is_terminal)
        self._task = self._bar.add_task(description, total=total, value="–")

    def __enter__(self) -> StepProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, completed: int, value: str, description: str | None = None) -> None:
        self.done = completed
        # escaped: spec names hold brackets (snapkv[chunk=16]:0.5) that Rich reads as markup
        fields = {"description": escape(description)} if description else {}
        self._bar.update(self._task, completed=completed, value=value, **fields)
        if not console.is_terminal:
            task = self._bar.tasks[0]
            console.print(f"{task.description} {completed}/{self.total} {self.metric} "
                          f"{escape(value)}", highlight=False)


class IngestProgress(StepProgress):
    """Documents ingested of ``total``, with the chunks written and their rate; its
    ``on_batch`` is what ``RagPipeline.ingest`` calls after each written batch."""

    def __init__(self, total: int, description: str = "ingesting documents") -> None:
        super().__init__(description, total, "chunks")
        self.on_batch = IngestCounter(self.update)
