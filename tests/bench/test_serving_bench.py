"""``kvrag bench serving``: the bound and overlap arithmetic, and the load mode end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvrag.bench.serving import baselines
from kvrag.bench.serving_load import max_overlap, memory_bound
from kvrag.cli.main import app

LOAD_KEYS = {"system", "max_running_requests", "bound_running_requests",
             "decode_tokens_per_s", "ttft_s_median", "tpot_s_median"}


def test_on_cuda_the_baseline_is_triton_with_cuda_graphs_beside_triton_without():
    import torch

    from kvrag.engines.device import Placement

    cuda = Placement(torch.device("cuda", 0), torch.bfloat16)
    assert baselines(cuda) == [("triton+cuda-graphs", True), ("triton", False)]
    assert baselines(Placement(torch.device("cpu"), torch.float32)) == [("torch_native", False)]


def test_memory_bound_counts_the_prefilling_request_at_its_whole_prompt():
    # a pool of 4 full requests runs 4 full ones
    assert memory_bound(4000, 4000, 100, 4 * 4100, 12) == 4
    # kept halves: 3 more prompts' worth of room, at 2,100 tokens each, past the 4,000 one
    assert memory_bound(4000, 2000, 100, 4 * 4100, 12) == 1 + (16400 - 4000) // 2100
    # capped by the requests there are, and 0 when one prompt cannot fit
    assert memory_bound(4000, 400, 100, 4 * 4100, 12) == 12
    assert memory_bound(5000, 5000, 10, 4000, 3) == 0


def test_max_overlap_of_request_intervals():
    assert max_overlap([(0, 5), (1, 2), (1.5, 6), (7, 8)]) == 3
    assert max_overlap([(0, 1), (1, 2)]) == 1  # one ends as the next starts
    assert max_overlap([]) == 0


@pytest.mark.slow
def test_load_mode_writes_rows_with_ratios_to_the_baseline(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    result = CliRunner().invoke(app, [
        "bench", "serving", "--model", str(tiny_model_dir), "--concurrency", "6",
        "--context-tokens", "300", "--new-tokens", "8", "--ratios", "0.9",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "6 requests at once" in result.output and "TPOT/base" in result.output
    data = json.loads(out.read_text())
    rows = {row["system"]: row for row in data["rows"]}
    assert list(rows) == ["torch_native full", "kvrag none", "kvrag snapkv:0.9"]
    for row in rows.values():
        assert set(row) >= LOAD_KEYS
        assert 1 <= row["max_running_requests"] <= 6
    base, none, compressed = rows.values()
    assert base["decode_vs_base"] == 1.0 and base["running_vs_bound"] <= 1.0
    # a pool of 4 full requests: 4 at once by memory, with or without the plugin
    assert base["bound_running_requests"] == none["bound_running_requests"] == 4
    assert none["same_tokens_as_base"]  # an uncompressed request answers as torch_native
    assert compressed["kv_tokens_median"] < 0.5 * base["kv_tokens_median"]
    assert compressed["bound_running_requests"] == 6  # the six requests cap it
    # and all six run at once: SGLang admits again once a compaction has freed slots
    assert compressed["max_running_requests"] == 6
    assert data["settings"]["pool_tokens"] == 4 * (data["settings"]["prompt_tokens_max"] + 8)


def test_load_mode_refuses_a_pool_too_small_for_one_request(tiny_model_dir):
    result = CliRunner().invoke(app, [
        "bench", "serving", "--model", str(tiny_model_dir), "--concurrency", "2",
        "--context-tokens", "300", "--pool-tokens", "100"])
    assert result.exit_code != 0
    assert "cannot hold one request" in result.output


def test_an_unknown_decode_path_is_refused(tiny_model_dir):
    result = CliRunner().invoke(app, ["bench", "serving", "--model", str(tiny_model_dir),
                                      "--decode-path", "fast"])
    assert result.exit_code != 0 and "use auto, python or inner" in result.output


@pytest.mark.slow
def test_shared_corpus_mode_holds_the_kept_corpus_once(tiny_model_dir, tmp_path):
    """Four questions over one corpus through the real engine: the compress-once row holds
    what its spec implies, less than the prefix cache, and far less than a kept copy per
    question; every row had all four decoding at once."""
    out = tmp_path / "shared.json"
    result = CliRunner().invoke(app, [
        "bench", "serving", "--model", str(tiny_model_dir), "--shared-corpus", "4",
        "--context-tokens", "1200", "--new-tokens", "6", "--ratios", "0.5",
        "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {r["system"]: r for r in report["rows"]}
    assert list(rows) == ["full", "snapkv:0.5", "once:snapkv:0.5"]
    assert all(r["running_at_peak"] == 4 for r in rows.values())
    once, full, per_question = rows["once:snapkv:0.5"], rows["full"], rows["snapkv:0.5"]
    assert 0.95 <= once["held_vs_implied"] <= 1.05
    assert once["slots_held"] < full["slots_held"] < per_question["slots_held"]
    assert full["held_vs_full"] == 1.0 and "held/implied" in result.output
    settings = report["settings"]
    assert settings["kept_prefix_tokens"]["once:snapkv:0.5"] < settings["corpus_prefix_tokens"]


@pytest.mark.slow
def test_shared_corpus_mode_serves_kvzip_once_at_two_ratios(tiny_model_dir, tmp_path):
    """KVzip compress-once at two ratios: its reconstruction runs in the engine, each
    stored prefix holds what its spec implies; per-question KVzip is not served."""
    out = tmp_path / "shared.json"
    result = CliRunner().invoke(app, [
        "bench", "serving", "--model", str(tiny_model_dir), "--shared-corpus", "3",
        "--context-tokens", "1200", "--new-tokens", "4", "--ratios", "0.5,0.75",
        "--method", "kvzip[heads=ranked]", "--repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["full", "once:kvzip[heads=ranked]:0.5",
                          "once:kvzip[heads=ranked]:0.75"]
    half, quarter = rows["once:kvzip[heads=ranked]:0.5"], rows["once:kvzip[heads=ranked]:0.75"]
    for row in (half, quarter):
        assert 0.95 <= row["held_vs_implied"] <= 1.05 and row["running_at_peak"] == 3
    assert quarter["slots_held"] < half["slots_held"] < rows["full"]["slots_held"]


def test_shared_corpus_mode_needs_two_questions(tiny_model_dir):
    result = CliRunner().invoke(app, ["bench", "serving", "--model", str(tiny_model_dir),
                                      "--shared-corpus", "1"])
    assert result.exit_code == 2 and "--shared-corpus" in result.output


@pytest.mark.slow
def test_shared_corpus_mode_puts_recall_beside_once(tiny_model_dir, tmp_path):
    """Span selection per question, compress-once, and compress-once recalling 64 tokens
    per question: the recalling row holds the kept corpus once plus each question's
    recalled and own tokens, and the host store shows up beside it."""
    out = tmp_path / "shared.json"
    method = "snapkv[chunk=16;heads=shared]"
    result = CliRunner().invoke(app, [
        "bench", "serving", "--model", str(tiny_model_dir), "--shared-corpus", "3",
        "--context-tokens", "1200", "--new-tokens", "4", "--ratios", "0.75",
        "--method", method, "--recall", "64", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    once, recall = f"once:{method}:0.75", f"once:{method}:0.75+recall@64"
    assert list(rows) == ["full", f"{method}:0.75", once, recall]
    assert 0.95 <= rows[recall]["held_vs_implied"] <= 1.05
    assert rows[recall]["running_at_peak"] == 3
    assert rows[recall]["slots_implied"] == rows[once]["slots_implied"] + 3 * 64
    assert rows[recall]["host_kv_bytes"] > 0 == rows[once]["host_kv_bytes"]
    assert "host KV MiB" in result.output


def test_recall_rows_need_a_method_that_keeps_shared_heads(tiny_model_dir):
    result = CliRunner().invoke(app, [
        "bench", "serving", "--model", str(tiny_model_dir), "--shared-corpus", "3",
        "--recall", "64"])
    assert result.exit_code != 0 and "heads=shared" in result.output
