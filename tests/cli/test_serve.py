"""``kvrag serve``: a real SGLang HTTP server with the plugin, driven by the OpenAI client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from http_helpers import free_port, wait_healthy
from typer.testing import CliRunner

from kvrag.cli.main import app
from kvrag.cli.serve import SGLangOptions, parse_sglang_args, server_command
from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance, write_jsonl
from kvrag.engines.device import resolve as resolve_placement
from kvrag.evaluation.judge import ChatClient, Judge, JudgeCase


def test_invalid_compression_is_refused_before_start():
    result = CliRunner().invoke(app, ["serve", "--compression", "snapkv:1.5"])
    assert result.exit_code == 2
    assert "0 <= RATIO < 1" in result.output and "snapkv" in result.output


def test_unknown_eviction_policy_is_refused():
    result = CliRunner().invoke(app, ["serve", "--eviction-policy", "belady"])
    assert result.exit_code == 2 and "kvrag-cost" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 accepts requests from other machines: set "
                            "--api-key"),
    (["--sglang-arg", "chunked-prefill-size"], "use KEY=VALUE"),
    (["--allow-request-specs", "retrieval:0.5"], "the SGLang plugin serves only methods"),
    (["--allow-request-specs", "snapkv:2"], "0 <= RATIO < 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--compression", "once:pyramidkv:0.5"], "one kept count for every layer"),
    (["--compression", "once:kvzip:0.5"], "reconstruction forward pass"),
])
def test_serve_refusals_come_before_start(args, message):
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and message in result.output


def test_server_command_passes_sglang_options_through(tmp_path):
    placement = resolve_placement("cpu", "bfloat16")
    options = SGLangOptions(context_length=32768, tp_size=2, mem_fraction_static=0.5,
                            extra=parse_sglang_args(["chunked-prefill-size=4096",
                                                     "--enable-metrics="]))
    cmd = server_command(tmp_path, "0.0.0.0", 8000, "lru", None, placement, options, "k3y")
    text = " ".join(cmd)
    assert "--device cpu --dtype bfloat16" in text and "--api-key k3y" in text
    assert "--context-length 32768 --mem-fraction-static 0.5 --tp-size 2" in text
    assert text.endswith("--chunked-prefill-size 4096 --enable-metrics")
    assert "0.3" not in cmd  # the CPU default only when none is given
    bare = server_command(tmp_path, "127.0.0.1", 8000, "lru", None, placement,
                          SGLangOptions())
    assert "--mem-fraction-static 0.3" in " ".join(bare) and "--api-key" not in bare


def _post(url: str, payload: dict) -> str:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:  # an aborted request may come back as an error
        return e.read().decode()


def _server_processes(port: int) -> list[str]:
    """Command lines of live processes started for an SGLang server on ``port``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "sglang.launch_server" in args and str(port) in args:
            found.append(" ".join(args))
    return found


@pytest.mark.slow
def test_sixteen_concurrent_openai_requests_with_compression(tiny_model_dir, tmp_path):
    from openai import OpenAI

    port = free_port()
    stats = tmp_path / "stats.jsonl"
    env = os.environ | {"KVRAG_PLUGIN_STATS": str(stats)}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "kvrag"), "serve", "--model", str(tiny_model_dir),
         "--compression", "snapkv:0.5", "--port", str(port), "--max-total-tokens", "16384"],
        env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        prompts = [" ".join(f"fact {i} number {j} is {i * j}." for j in range(40))
                   for i in range(16)]

        def ask(prompt: str):
            return client.completions.create(
                model=str(tiny_model_dir), prompt=prompt, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, prompts))
        assert [a.usage.completion_tokens for a in answers] == [8] * 16
        assert all(isinstance(a.choices[0].text, str) for a in answers)
        records = [json.loads(line) for line in stats.read_text().splitlines()]
        assert len(records) == 16 and {r["spec"] for r in records} == {"snapkv:0.5"}
        assert all(r["freed"] > 0 for r in records)

        # the same server as the GRPO judge: one step of `kvrag train grpo --reward judge`
        data = tmp_path / "judge.jsonl"
        docs = [Doc(f"d{j}", f"Town {j}", f"Ana {j} was born in Town {j}.") for j in range(3)]
        write_jsonl([Instance("q0", "Where was Ana 1 born?", ["Town 1"], docs, ["d1"])], data)
        result = CliRunner().invoke(app, [
            "train", "grpo", "--reward", "judge", "--judge-url", f"{url}/v1", "--dataset",
            str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "adapter"),
            "--steps", "1", "--generations", "2", "--batch-size", "2",
            "--max-completion-tokens", "6", "--rank", "4"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "adapter" / "adapter_config.json").exists()
        # both completions get to the judge only with the answer marker (else reward 0)
        assert re.search(r"Judge \S+: [0-2] completions rated", result.output), result.output
        judge = Judge(ChatClient(f"{url}/v1"))
        instance = Instance("q0", "Where was Ana 1 born?", ["Town 1"], docs, ["d1"])
        rating = judge(JudgeCase.of(instance, build_prompt(instance),
                                    "[DOC 2] The answer is: Town 1"))
        assert rating is None or 0.0 <= rating <= 1.0
        assert judge.calls == 1 and judge.unparsed == (rating is None)

        # and as compare's answer judge, rating every output of every system
        run = tmp_path / "judged-run"
        result = CliRunner().invoke(app, [
            "compare", "--out", str(run), "--dataset", str(data), "--model",
            str(tiny_model_dir), "--systems", "full,snapkv:0.5", "--max-new-tokens", "4",
            "--judge-url", f"{url}/v1"])
        assert result.exit_code == 0, result.output
        assert json.loads((run / "run.json").read_text())["judge_model"] == judge.model
        records = [json.loads(line) for line in (run / "results.jsonl").open()]
        assert len(records) == 2 and all("judge" in r["scores"] for r in records)
        assert all(r["scores"]["judge"] is None or 0 <= r["scores"]["judge"] <= 1
                   for r in records)
        assert f"Judge {judge.model}: 2 outputs rated" in result.output

        # by default requests may ask only for the server's own spec or none
        body = _post(f"{url}/generate", {"text": "hello there", "sampling_params": {
            "max_new_tokens": 2, "custom_params": {"kvrag_compression": "h2o:0.5"}}})
        assert "is not allowed on this server; allowed: none, snapkv:0.5" in body

        # SIGTERM to `kvrag serve` alone stops the SGLang server and its workers
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))
        assert not _server_processes(port)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
