"""``kvrag serve``: a real SGLang HTTP server with the plugin and an API key, driven by the
OpenAI client, urllib and the judge client. The server starts once for the module; its model
is a tiny Llama that answers any prompt as a judge does, with ``[[JUDGE_RATING]]``."""

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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from http_helpers import free_port, wait_healthy
from typer.testing import CliRunner

from kvrag.cli.main import app
from kvrag.cli.serve import SGLangOptions, parse_sglang_args, server_command
from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance, write_jsonl
from kvrag.engines.device import resolve as resolve_placement
from kvrag.evaluation.judge import (
    RATING_MAX,
    ChatClient,
    Judge,
    JudgeCase,
    JudgeUnavailableError,
)

API_KEY = "k3y-of-the-test-server"
JUDGE_RATING = 73


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
    (["--compression", "kvzip:0.5"], "reconstruction forward passes"),
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
    request = urllib.request.Request(url, json.dumps(payload).encode(), {
        "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
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


@pytest.fixture(scope="module")
def judge_model_dir(tmp_path_factory, tiny_model_dir, smollm2_tokenizer) -> Path:
    """``tiny_model_dir``'s random Llama, made to answer any prompt greedily with
    ``[[JUDGE_RATING]]``: the next token depends only on the last one. Each reply token's
    embedding is a basis direction of its own, every other token's the first one, scaled to
    drown what the random layers add; the untied LM head maps direction k to the reply's
    token k (the last one EOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer
    reply = tokenizer(f"[[{JUDGE_RATING}]]", add_special_tokens=False)["input_ids"]
    reply.append(tokenizer.eos_token_id)
    assert len(set(reply)) == len(reply)  # one direction per reply token
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model_dir,
                                                         tie_word_embeddings=False))
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, 0] = 1000.0
        for k, token in enumerate(reply):
            head[token, k] = 1.0
            if k + 1 < len(reply):
                embed[token, 0], embed[token, k + 1] = 0.0, 1000.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = tmp_path_factory.mktemp("judge-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    model: Path
    stats: Path
    process: subprocess.Popen

    def stats_records(self) -> list[dict]:
        """The plugin's per-request stats so far."""
        if not self.stats.exists():
            return []
        return [json.loads(line) for line in self.stats.read_text().splitlines()]


@pytest.fixture(scope="module")
def server(judge_model_dir, tmp_path_factory) -> Iterator[Server]:
    """``kvrag serve --api-key API_KEY --compression snapkv:0.5``, one for the module."""
    port = free_port()
    stats = tmp_path_factory.mktemp("serve") / "stats.jsonl"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "kvrag"), "serve", "--model", str(judge_model_dir),
         "--compression", "snapkv:0.5", "--port", str(port), "--max-total-tokens", "16384",
         "--api-key", API_KEY],
        env=os.environ | {"KVRAG_PLUGIN_STATS": str(stats)}, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield Server(url, port, judge_model_dir, stats, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


DOCS = [Doc(f"d{j}", f"Town {j}", f"Ana {j} was born in Town {j}.") for j in range(3)]
INSTANCE = Instance("q0", "Where was Ana 1 born?", ["Town 1"], DOCS, ["d1"])


@pytest.mark.slow
def test_sixteen_concurrent_openai_requests_with_compression(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    prompts = [" ".join(f"fact {i} number {j} is {i * j}." for j in range(40))
               for i in range(16)]
    seen = len(server.stats_records())

    def ask(prompt: str):
        return client.completions.create(
            model=str(server.model), prompt=prompt, max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    assert [a.usage.completion_tokens for a in answers] == [8] * 16
    assert all(isinstance(a.choices[0].text, str) for a in answers)
    records = server.stats_records()[seen:]
    assert len(records) == 16 and {r["spec"] for r in records} == {"snapkv:0.5"}
    assert all(r["freed"] > 0 for r in records)


@pytest.mark.slow
def test_the_api_key_is_required(server):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.url}/v1/models", timeout=30)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{server.url}/v1/models",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and json.loads(response.read())["data"]
    client = OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key")
    with pytest.raises(AuthenticationError):
        client.completions.create(model=str(server.model), prompt="hi", max_tokens=2)


@pytest.mark.slow
def test_a_served_judge_rates_only_with_the_servers_key(server):
    judge = Judge(ChatClient(f"{server.url}/v1", api_key=API_KEY))
    rating = judge(JudgeCase.of(INSTANCE, build_prompt(INSTANCE),
                                "[DOC 2] The answer is: Town 1"))
    assert rating == JUDGE_RATING / RATING_MAX
    assert judge.calls == 1 and judge.unparsed == 0
    with pytest.raises(JudgeUnavailableError,
                       match=r"refused the request \(401\).*--judge-api-key"):
        ChatClient(f"{server.url}/v1")
    with pytest.raises(JudgeUnavailableError, match=r"refused the request \(401\)"):
        ChatClient(f"{server.url}/v1", model=judge.model, api_key="not-the-key").complete(
            "Rate this.", max_tokens=12)


@pytest.mark.slow
def test_compare_rates_every_output_with_the_judge_api_key(server, tiny_model_dir,
                                                           tmp_path):
    data = tmp_path / "judge.jsonl"
    write_jsonl([INSTANCE], data)
    args = ["compare", "--dataset", str(data), "--model", str(tiny_model_dir), "--systems",
            "full,snapkv:0.5", "--max-new-tokens", "4", "--judge-url", f"{server.url}/v1"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "--judge-api-key" in refused.output

    run = tmp_path / "judged-run"
    result = CliRunner().invoke(app, [*args, "--out", str(run), "--judge-api-key", API_KEY])
    assert result.exit_code == 0, result.output
    model = json.loads((run / "run.json").read_text())["judge_model"]
    assert model == ChatClient(f"{server.url}/v1", api_key=API_KEY).model
    records = [json.loads(line) for line in (run / "results.jsonl").open()]
    assert [r["scores"]["judge"] for r in records] == [JUDGE_RATING / RATING_MAX] * 2
    assert f"Judge {model}: 2 outputs rated, 0 replies without a readable rating" \
        in result.output


@pytest.mark.slow
@pytest.mark.trl
def test_grpo_judge_reward_takes_the_key_from_the_environment(server, tiny_model_dir,
                                                              tmp_path):
    data = tmp_path / "judge.jsonl"
    write_jsonl([INSTANCE], data)
    result = CliRunner().invoke(app, [
        "train", "grpo", "--reward", "judge", "--judge-url", f"{server.url}/v1", "--dataset",
        str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "adapter"),
        "--steps", "1", "--generations", "2", "--batch-size", "2",
        "--max-completion-tokens", "6", "--rank", "4"],
        env={"KVRAG_JUDGE_API_KEY": API_KEY})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # both completions get to the judge only with the answer marker (else reward 0)
    assert re.search(r"Judge \S+: [0-2] completions rated", result.output), result.output


@pytest.mark.slow
def test_requests_may_ask_only_for_the_servers_spec_or_none(server):
    body = _post(f"{server.url}/generate", {"text": "hello there", "sampling_params": {
        "max_new_tokens": 2, "custom_params": {"kvrag_compression": "h2o:0.5"}}})
    assert "is not allowed on this server; allowed: none, snapkv:0.5" in body


@pytest.mark.slow
def test_sigterm_stops_the_server_and_its_workers(server):
    # last in the module: it stops the module's server
    assert server.process.poll() is None
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=120) == 0
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", server.port))
    assert not _server_processes(server.port)
