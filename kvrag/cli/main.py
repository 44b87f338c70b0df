"""The ``kvrag`` app: command groups composed with ``add_typer``."""

from __future__ import annotations

import os

# kvrag never downloads at run time: every model comes from an installed package or a path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer  # noqa: E402

from kvrag.cli import analyze, bench, data, rag, train  # noqa: E402
from kvrag.cli.common import report_error  # noqa: E402
from kvrag.cli.compare import compare  # noqa: E402
from kvrag.cli.report import report  # noqa: E402
from kvrag.cli.serve import serve  # noqa: E402
from kvrag.extras import MissingExtraError  # noqa: E402

app = typer.Typer(
    help="Long-context LM vs compressed KV cache vs RAG, on identical questions.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Click's plain help, for every command group too: Rich's option tables cut long option
    # names and words with '…' in an 80-column terminal, and read help text as markup
    # (snapkv[chunk=16] loses its brackets).
    rich_markup_mode=None,
)
app.command()(compare)
app.command()(report)
app.command()(serve)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.add_typer(rag.app, name="rag")
app.add_typer(train.app, name="train")
app.add_typer(analyze.app, name="analyze")


def main() -> None:
    """The ``kvrag`` command: a missing optional part ends with the pip line to run,
    wherever in a command it is found."""
    try:
        app()
    except MissingExtraError as e:
        report_error(str(e))
        raise SystemExit(2) from None
