import json

from typer.testing import CliRunner

from kvrag.cli.main import app


def _run_dir(path, adapter, subem):
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"model": "smollm2", "adapter": adapter}))
    (path / "results.jsonl").write_text(json.dumps(
        {"id": "q1", "group": "single_hop", "system": "full", "scores": {"subem": subem}}) + "\n")
    return path


def test_report_writes_the_table_across_runs(tmp_path):
    base = _run_dir(tmp_path / "base", None, 0.0)
    tuned = _run_dir(tmp_path / "tuned", "/a/sft-answer", 1.0)
    out = tmp_path / "table.md"
    result = CliRunner().invoke(app, ["report", str(base), str(tuned), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| full | sft-answer | 1 | 100.0 | 100.0 [100.0, 100.0] | +100.0" in out.read_text()


def test_report_on_a_folder_without_results_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a kvrag compare output" in result.output
