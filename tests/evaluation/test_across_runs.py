import json

import pytest

from kvrag.evaluation.across_runs import compare_runs, load_run, load_runs, render_markdown


def _write_run(path, model, adapter, answers):
    """answers: {(question id, group, system): subem}."""
    path.mkdir()
    config = {"model": model, "dataset": "demo"} | ({"adapter": adapter} if adapter else {})
    (path / "run.json").write_text(json.dumps(config))
    lines = [json.dumps({"id": q, "group": g, "system": s, "scores": {"subem": v, "em": v / 2}})
             for (q, g, s), v in answers.items()]
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def runs(tmp_path):
    base = _write_run(tmp_path / "base", "smollm2", None, {
        ("q1", "a", "full"): 1.0, ("q2", "a", "full"): 0.0, ("q3", "b", "full"): 0.0,
        ("q4", "b", "full"): 1.0,  # the adapter run never reached q4
        ("q1", "a", "snapkv:0.5"): 0.0, ("q2", "a", "snapkv:0.5"): 0.0,
        ("q3", "b", "snapkv:0.5"): 0.0, ("q4", "b", "snapkv:0.5"): 0.0,
    })
    tuned = _write_run(tmp_path / "tuned", "smollm2", "/x/sft-ids", {
        ("q1", "a", "full"): 1.0, ("q2", "a", "full"): 1.0, ("q3", "b", "full"): 1.0,
        ("q1", "a", "snapkv:0.5"): 1.0, ("q2", "a", "snapkv:0.5"): 1.0,
        ("q3", "b", "snapkv:0.5"): 0.0,
    })
    return [load_run(base), load_run(tuned)]


def test_scores_only_questions_every_run_answered(runs):
    table = compare_runs(runs)
    full = table["systems"]["full"]
    assert set(full) == {"smollm2", "sft-ids"}
    assert full["smollm2"]["n"] == 3 and full["smollm2"]["score"] == pytest.approx(1 / 3)
    assert full["sft-ids"]["by_group"] == {"a": {"n": 2, "score": 1.0, "ci95": [1.0, 1.0]},
                                           "b": {"n": 1, "score": 1.0, "ci95": [1.0, 1.0]}}


def test_delta_is_paired_against_the_first_run_and_change_against_own_full(runs):
    table = compare_runs(runs)
    tuned = table["systems"]["full"]["sft-ids"]
    assert tuned["vs_baseline"]["delta"] == pytest.approx(2 / 3)
    assert "vs_baseline" not in table["systems"]["full"]["smollm2"]
    snap = table["systems"]["snapkv:0.5"]
    assert snap["sft-ids"]["vs_own_reference"] == pytest.approx((2 / 3 - 1.0) / 1.0)
    assert snap["smollm2"]["vs_own_reference"] == pytest.approx(-1.0)
    assert "vs_own_reference" not in table["systems"]["full"]["sft-ids"]
    assert snap["smollm2"]["vs_reference"]["delta"] == pytest.approx(-1 / 3)


def test_a_chosen_reference_pairs_every_system_against_it(runs):
    table = compare_runs(runs, reference="snapkv:0.5")
    assert table["reference"] == "snapkv:0.5"
    full = table["systems"]["full"]["smollm2"]
    assert full["vs_reference"]["delta"] == pytest.approx(1 / 3)
    assert "vs_reference" not in table["systems"]["snapkv:0.5"]["smollm2"]
    assert "Δ vs own snapkv:0.5 [95% CI]" in render_markdown(table)


def test_markdown_has_a_row_per_system_and_model(runs):
    text = render_markdown(compare_runs(runs))
    rows = [line for line in text.splitlines() if line.startswith("| full") or
            line.startswith("| snapkv")]
    assert len(rows) == 4
    assert "| snapkv:0.5 | sft-ids | 3 | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] |" in text


def test_same_model_runs_get_their_directory_names(tmp_path):
    one = _write_run(tmp_path / "hf", "smollm2", None, {("q1", "a", "full"): 1.0})
    two = _write_run(tmp_path / "sglang", "smollm2", None, {("q1", "a", "full"): 1.0})
    assert [r.label for r in load_runs([one, two])] == ["smollm2 (hf)", "smollm2 (sglang)"]


def test_other_metrics_use_their_own_scores(runs):
    table = compare_runs(runs, ["full"], metric="em")
    assert table["metric"] == "em"
    assert table["systems"]["full"]["sft-ids"]["score"] == pytest.approx(0.5)
    assert table["systems"]["full"]["sft-ids"]["vs_baseline"]["delta"] == pytest.approx(1 / 3)
    assert "| EM [95% CI] |" in render_markdown(table)


def test_unknown_system_and_missing_run_are_clear_errors(runs, tmp_path):
    with pytest.raises(ValueError, match="no run answered system 'rag:1024'"):
        compare_runs(runs, ["rag:1024"])
    with pytest.raises(ValueError,
                       match="unknown metric 'bleu'; use one of task, subem, subem_output, em, f1"):
        compare_runs(runs, metric="bleu")
    with pytest.raises(FileNotFoundError, match="not a kvrag compare output"):
        load_run(tmp_path)


def test_same_answer_as_full_counts_unchanged_answers_under_a_system(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"model": "smollm2"}))
    records = [("q1", "full", "Ashford"), ("q1", "snapkv:0.5", " ashford"),
               ("q2", "full", "Mosscombe"), ("q2", "snapkv:0.5", "Ashwick")]
    (path / "results.jsonl").write_text("".join(
        json.dumps({"id": q, "group": "a", "system": s, "answer": a,
                    "scores": {"subem": 0.0}}) + "\n" for q, s, a in records))
    table = compare_runs([load_run(path)])
    assert table["systems"]["snapkv:0.5"]["smollm2"]["same_as_reference"]["rate"] == 0.5
    assert "same_as_reference" not in table["systems"]["full"]["smollm2"]
    assert "| 50% [" in render_markdown(table)


def test_a_run_still_writing_is_read_to_its_last_complete_line(runs, tmp_path):
    path = tmp_path / "tuned" / "results.jsonl"
    size = path.stat().st_size
    with path.open("a") as f:
        f.write('{"id": "q4", "group": "b", "sys')
    assert set(load_run(tmp_path / "tuned").by_system["full"]) == {"q1", "q2", "q3"}
    assert path.stat().st_size > size  # the writer's partial line is left alone


def test_runs_on_different_data_are_refused(tmp_path):
    base = _write_run(tmp_path / "base", "smollm2", None, {("q1", "a", "full"): 1.0})
    other = _write_run(tmp_path / "other", "smollm2", "/x/a", {("q1", "a", "full"): 1.0})
    for path, sha in ((base, "a" * 64), (other, "b" * 64)):
        config = json.loads((path / "run.json").read_text()) | {"dataset_sha256": sha}
        (path / "run.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{base} \(dataset 'demo'\) and {other} \(dataset "
                                         r"'demo'\) differ in dataset_sha256 'aaaaaaaaaaaa' "
                                         "vs 'bbbbbbbbbbbb';"):
        load_runs([base, other])
    assert len(load_runs([base, base])) == 2


def test_runs_with_another_token_limit_are_refused(tmp_path):
    runs = []
    for name, limit in (("a", 32), ("b", 128)):
        path = _write_run(tmp_path / name, "smollm2", None, {("q1", "a", "full"): 1.0})
        config = json.loads((path / "run.json").read_text()) | {"max_new_tokens": limit}
        (path / "run.json").write_text(json.dumps(config))
        runs.append(path)
    with pytest.raises(ValueError, match="differ in max_new_tokens 32 vs 128"):
        load_runs(runs)


def test_subem_output_is_a_report_metric(tmp_path):
    answers = {("q1", "a", "full"): 0.0, ("q2", "a", "full"): 1.0}
    base = _write_run(tmp_path / "base", "m", None, answers)
    lines = [json.loads(x) for x in (base / "results.jsonl").read_text().splitlines()]
    for line in lines:
        line["scores"]["subem_output"] = 1.0
    (base / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = compare_runs([load_run(base)], metric="subem_output")
    assert table["systems"]["full"]["m"]["score"] == 1.0
    assert "SubEM of the whole output" in render_markdown(table)
    old = _write_run(tmp_path / "old", "m", None, answers)  # no subem_output recorded
    with pytest.raises(ValueError, match="no subem_output scores for full"):
        compare_runs([load_run(old)], metric="subem_output")
