"""The ``kvrag`` app as a whole: every command and subcommand's ``--help``."""

from __future__ import annotations

import re

import click
import pytest
import typer.main
import typer.rich_utils
from typer.testing import CliRunner

from kvrag.cli.main import app

WIDTH = 80


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> list:
    """``command`` and every command below it, each as a test case named by its path."""
    cases = [pytest.param(path, command, id=" ".join(("kvrag", *path)))]
    for name, sub in getattr(command, "commands", {}).items():
        cases += _commands(sub, (*path, name))
    return cases


def _option_names(command: click.Command) -> list[str]:
    names = [opt for param in command.params if not getattr(param, "hidden", False)
             for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")]
    return [*names, "--help"]  # click adds --help at run time, outside command.params


@pytest.mark.parametrize(("path", "command"), _commands(typer.main.get_command(app)))
def test_help_shows_every_option_name_whole_in_80_columns(path, command, monkeypatch):
    # Typer's Rich help reads TERMINAL_WIDTH once, when imported
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", WIDTH)
    result = CliRunner().invoke(app, [*path, "--help"],
                                env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)})
    assert result.exit_code == 0, result.output
    text = result.output
    missing = [name for name in _option_names(command)
               if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]
    assert not missing, text
    assert not re.search(r"--[\w-]*…", text), text
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
