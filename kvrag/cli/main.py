"""The ``kvrag`` app: command groups composed with ``add_typer``."""

from __future__ import annotations

import os

# kvrag never downloads at run time: every model comes from an installed package or a path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer  # noqa: E402

from kvrag.cli import analyze, bench, data, rag, train  # noqa: E402
from kvrag.cli.compare import compare  # noqa: E402
from kvrag.cli.report import report  # noqa: E402
from kvrag.cli.serve import serve  # noqa: E402

app = typer.Typer(
    help="Long-context LM vs compressed KV cache vs RAG, on identical questions.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command()(compare)
app.command()(report)
app.command()(serve)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.add_typer(rag.app, name="rag")
app.add_typer(train.app, name="train")
app.add_typer(analyze.app, name="analyze")
