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
    assert ("| full | sft-answer | 1 | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] | +100.0"
            in out.read_text())


def test_report_on_a_folder_without_results_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a kvrag compare output" in result.output


def test_report_refuses_runs_of_different_datasets(tmp_path):
    base = _run_dir(tmp_path / "base", None, 0.0)
    other = _run_dir(tmp_path / "other", "/a/sft-answer", 1.0)
    for path, sha in ((base, "1" * 64), (other, "2" * 64)):
        config = json.loads((path / "run.json").read_text())
        (path / "run.json").write_text(json.dumps(config | {"dataset_sha256": sha}))
    result = CliRunner().invoke(app, ["report", str(base), str(other)])
    assert result.exit_code == 2
    assert "differ in dataset_sha256" in result.output
    assert "111111111111" in result.output and "222222222222" in result.output


def test_report_by_subem_of_the_whole_output(tmp_path):
    base = _run_dir(tmp_path / "base", None, 0.0)
    record = json.loads((base / "results.jsonl").read_text())
    record["scores"]["subem_output"] = 1.0
    (base / "results.jsonl").write_text(json.dumps(record) + "\n")
    result = CliRunner().invoke(app, ["report", str(base), "--metric", "subem_output"])
    assert result.exit_code == 0, result.output
    assert "| full | smollm2 | 1 | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |" in result.output


def test_report_draws_a_length_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for n, scores in ((1000, (1.0, 1.0)), (4000, (1.0, 0.0))):
        run = sweep / f"len-{n}"
        run.mkdir()
        (run / "run.json").write_text(json.dumps({"model": "smollm2", "context_tokens": n,
                                                  "dataset_sha256": str(n)}))
        lines = [{"id": f"q{i}", "group": "single_hop", "task": "qa", "system": "full",
                  "scores": {"subem": v}, "cost": {"prompt_tokens": n - 10}}
                 for i, v in enumerate(scores)]
        lines.append({"id": "only-here", "group": "single_hop", "task": "qa",
                      "system": "full", "scores": {"subem": 0.0},
                      "cost": {"prompt_tokens": n}} if n == 1000 else lines[0])
        (run / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = CliRunner().invoke(app, ["report", str(sweep / "len-1000"), str(sweep / "len-4000")])
    assert result.exit_code == 0, result.output
    # only the questions answered at every length: q0 and q1
    assert "| full | 100.0 [100.0, 100.0] (2) | 50.0 [0.0, 100.0] (2) |" in result.output
    assert (sweep / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"
