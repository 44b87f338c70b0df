"""A live fleet on loopback: two ``kvrag serve`` workers (tiny Llama, CPU, bounded pools)
behind the real sglang-router, started once for the module and stopped by its last test.

Through the router: the same answers as one server, every compressed request's spec and
span in its worker's stats, the key required, the allow-list enforced, compressed corpora
built once behind the cache-aware policy, and a worker SIGKILLed mid-run without an
answer lost, doubled or left uncompressed. And SGLang's own data parallelism (two ranks
in one server) with the plugin."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvrag.bench.fleet import bench_fleet, shared_questions
from kvrag.bench.fleet_processes import Fleet, server_pids
from kvrag.cli.main import app
from kvrag.data.loaders import load_dataset
from kvrag.data.prompt import build_prompt
from kvrag.data.schema import write_jsonl
from kvrag.engines.chat import encode_prompt

pytestmark = pytest.mark.slow

KEY = "k3y-of-the-fleet"
ALLOWED = "none,snapkv:0.5,once:snapkv:0.5"
SYSTEMS = "full,snapkv:0.5,once:snapkv:0.5,rag:256"
runner = CliRunner()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir):
    fleet = Fleet.start(tiny_model_dir, 2, tmp_path_factory.mktemp("fleet"), api_key=KEY,
                        max_total_tokens=16384, allow_request_specs=ALLOWED)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def router(fleet):
    with fleet.router("cache_aware") as url:
        yield url


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """Two bundled corpora, two questions over each."""
    path = tmp_path_factory.mktemp("data") / "shared.jsonl"
    write_jsonl(shared_questions(load_dataset("demo-shared"), 2, 2), path)
    return path


def compare(out: Path, model: Path, url: str, dataset: Path, *extra: str, key: str = KEY):
    return runner.invoke(app, [
        "compare", "--out", str(out), "--model", str(model), "--engine", "sglang-url",
        "--url", url, "--api-key", key, "--dataset", str(dataset), "--max-new-tokens", "6",
        "--index-dir", str(out.parent / f"{out.name}-index"), *extra])


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_server(tmp_path_factory, fleet, tiny_model_dir, questions) -> dict:
    """Every system's answers from the first worker alone, by its own URL."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = compare(out, tiny_model_dir, fleet.workers[0].url, questions, "--systems", SYSTEMS)
    assert result.exit_code == 0, result.output[-2000:]
    return {(r["id"], r["system"]): r["output"] for r in records(out)}


def test_the_router_answers_as_one_server_and_carries_each_spec(
        tmp_path, fleet, router, one_server, tiny_model_dir, smollm2_tokenizer, questions):
    for worker in fleet.workers:  # no corpus stored yet: each is built behind the router
        worker.flush(KEY)
    before = [len(w.stats_records()) for w in fleet.workers]
    result = compare(tmp_path / "run", tiny_model_dir, router, questions, "--systems", SYSTEMS)
    assert result.exit_code == 0, result.output[-2000:]
    got = records(tmp_path / "run")
    assert {(r["id"], r["system"]): r["output"] for r in got} == one_server
    compressed = [r for r in got if r["system"] in ("snapkv:0.5", "once:snapkv:0.5")]
    assert all(not r["cost"]["served_uncompressed"]
               and r["cost"]["kv_tokens"] < r["cost"]["prompt_tokens"] for r in compressed)
    # each compressed request's own spec and document span reached a worker
    stats = [s for w, n in zip(fleet.workers, before, strict=True)
             for s in w.stats_records()[n:]]
    instances = load_dataset(str(questions))
    spans = {i.id: encode_prompt(smollm2_tokenizer, build_prompt(i)).span for i in instances}
    corpus_span = {i.corpus_id: list(spans[i.id]) for i in instances}
    assert sorted(tuple(s["span"]) for s in stats if s["spec"] == "snapkv:0.5") == \
        sorted(spans.values())
    # behind the cache-aware router each corpus was compressed once, then matched
    built = [s for s in stats if s.get("once") == "built"]
    assert sorted(s["span"] for s in built) == sorted(corpus_span.values())
    assert sum(s.get("once") == "hit" for s in stats) == 2


def test_the_fleet_key_is_required_at_the_router(tmp_path, router, tiny_model_dir, questions):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        request = urllib.request.Request(
            router + "/generate", json.dumps({"input_ids": [1, 2, 3], "sampling_params": {
                "max_new_tokens": 1}}).encode(), {"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 401
    result = compare(tmp_path / "run", tiny_model_dir, router, questions, key="wrong")
    assert result.exit_code == 2 and "(401)" in result.output
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_a_spec_outside_the_allow_list_is_refused_through_the_router(
        tmp_path, router, tiny_model_dir, questions):
    result = compare(tmp_path / "run", tiny_model_dir, router, questions,
                     "--systems", "knorm:0.5", "--limit", "1")
    assert result.exit_code == 2
    assert "not allowed on this server; allowed: none, once:snapkv:0.5, snapkv:0.5" in \
        " ".join(result.output.split())


def test_cache_aware_routing_builds_each_corpus_once(fleet, questions):
    settings, rows = bench_fleet(fleet, load_dataset(str(questions)),
                                 policies=("cache_aware", "round_robin"), new_tokens=4)
    full, aware, rr = rows
    assert (full.system, aware.policy, rr.policy) == ("full", "cache_aware", "round_robin")
    assert settings["corpora"] == 2 and all(r.questions == 4 for r in rows)
    assert aware.builds_per_corpus == 1.0 and aware.hit_rate == 1.0
    assert 0 < aware.slots_held < 0.6 * full.slots_held
    for row in rows:  # every question either built its corpus on its worker or reused it
        assert row.builds + round(row.hit_rate * 2) == 4 and row.resent == 0


def test_data_parallel_ranks_inside_one_server_answer_alike(
        tmp_path, monkeypatch, one_server, tiny_model_dir, questions):
    """SGLang's own --dp-size with the plugin. On a CPU, SGLang starts two ranks on one
    NUMA node only when told which cores each rank has."""
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    server = Fleet.start(tiny_model_dir, 1, tmp_path / "logs", api_key=KEY,
                         max_total_tokens=16384, allow_request_specs=ALLOWED,
                         serve_args=("--sglang-arg", "dp-size=2"))
    try:
        info = json.loads(urllib.request.urlopen(urllib.request.Request(
            server.workers[0].url + "/server_info",
            headers={"Authorization": f"Bearer {KEY}"}), timeout=30).read())
        assert info["dp_size"] == 2 and len(info["internal_states"]) == 2
        result = compare(tmp_path / "run", tiny_model_dir, server.workers[0].url, questions,
                         "--systems", SYSTEMS, "--concurrency", "2")
        assert result.exit_code == 0, result.output[-2000:]
        assert {(r["id"], r["system"]): r["output"]
                for r in records(tmp_path / "run")} == one_server
    finally:
        server.stop()


def test_a_worker_killed_mid_run_loses_no_answer(tmp_path, fleet, router, one_server,
                                                 tiny_model_dir, questions):
    out = tmp_path / "run"
    killed = threading.Event()

    before = [len(w.stats_records()) for w in fleet.workers]

    def kill_when_answers_land() -> None:
        """SIGKILL, once answers land, a worker that serves one of the corpora."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            path = out / "results.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= 3:
                busy = [len(w.stats_records()) - n
                        for w, n in zip(fleet.workers, before, strict=True)]
                fleet.workers[busy.index(max(busy))].kill()
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_answers_land)
    watcher.start()
    result = compare(out, tiny_model_dir, router, questions, "--systems", SYSTEMS,
                     "--concurrency", "2")
    watcher.join()
    assert killed.is_set()
    if result.exit_code != 0:  # the run stopped with what to do: a rerun resumes
        assert "a rerun resumes after them" in result.output, result.output
        result = compare(out, tiny_model_dir, router, questions, "--systems", SYSTEMS,
                         "--concurrency", "2")
    else:  # the lost requests were sent again through the router
        assert "lost on their way" in result.output
    assert result.exit_code == 0, result.output
    got = records(out)
    keys = [(r["id"], r["system"]) for r in got]
    assert len(keys) == len(set(keys)) == len(one_server)  # none lost, none twice
    assert {(r["id"], r["system"]): r["output"] for r in got} == one_server
    assert all(not r["cost"]["served_uncompressed"] for r in got
               if r["system"] in ("snapkv:0.5", "once:snapkv:0.5"))


def test_stopping_the_fleet_leaves_nothing_running(fleet):
    fleet.stop()
    assert all(w.process.poll() is not None for w in fleet.workers)
    assert not any(server_pids(w.port) for w in fleet.workers)
