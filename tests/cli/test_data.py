from pathlib import Path

from typer.testing import CliRunner

from kvrag.cli.main import app
from kvrag.data.demo import make_demo
from kvrag.data.schema import read_jsonl

runner = CliRunner()


def test_make_demo_then_check(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    result = runner.invoke(app, ["data", "make-demo", "--out", str(out), "--seed", "7",
                                 "--context-tokens", "400", "--per-task", "3"])
    assert result.exit_code == 0, result.output
    assert read_jsonl(out) == make_demo(seed=7, context_tokens=400, per_task=3)
    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code == 0
    assert "12 valid instances over 12 corpora" in result.output
    assert "finance: 3" in result.output


def test_make_demo_with_shared_corpora(tmp_path: Path) -> None:
    out = tmp_path / "shared.jsonl"
    result = runner.invoke(app, ["data", "make-demo", "--out", str(out), "--context-tokens",
                                 "800", "--per-task", "2", "--questions-per-corpus", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "check", str(out)])
    assert "8 valid instances over 2 corpora" in result.output, result.output
    result = runner.invoke(app, ["data", "make-demo", "--out", str(out), "--per-task", "2",
                                 "--questions-per-corpus", "3"])
    assert result.exit_code == 2 and "divide the 8 questions" in result.output


def test_make_demo_refuses_tiny_context(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "make-demo", "--out", str(tmp_path / "d.jsonl"),
                                 "--context-tokens", "5"])
    assert result.exit_code == 2
    assert "context_tokens must be at least 200" in result.output
    assert not (tmp_path / "d.jsonl").exists()


def test_make_needles_then_check(tmp_path: Path) -> None:
    out = tmp_path / "needles.jsonl"
    result = runner.invoke(app, ["data", "make-needles", "--out", str(out), "--context-tokens",
                                 "800", "--corpora", "2", "--needles", "3",
                                 "--tasks", "multikey,single", "--kinds", "word"])
    assert result.exit_code == 0, result.output
    assert "Wrote 8 questions over 4 corpora" in result.output
    result = runner.invoke(app, ["data", "check", str(out)])
    assert "multikey_word: 6, single_word: 2" in result.output, result.output
    result = runner.invoke(app, ["data", "make-needles", "--out", str(out), "--kinds", "uuid"])
    assert result.exit_code != 0 and "kinds: number, word, name" in result.output
