"""The ``kvrag`` app: command groups composed with ``add_typer``."""

from __future__ import annotations

import typer

from kvrag.cli import data
from kvrag.cli.compare import compare

app = typer.Typer(
    help="Long-context LM vs compressed KV cache vs RAG, on identical questions.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command()(compare)
app.add_typer(data.app, name="data")
