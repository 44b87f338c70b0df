"""Greedy generation against an SGLang deployment that is already running, by URL.

The deployment may be a ``kvrag serve``, a plain SGLang server, or sglang-router in front
of many. Prompts are encoded here with the local tokenizer of ``--model`` (the same chat
template and document span as the other engines) and sent as token ids to ``/generate``.
Compressed systems need the kvrag plugin there: ``/server_info`` says which attention
backend the server runs, and a server without it gets only full-cache requests.

The KV slots and bytes an answer held are the server's report (``served.py``), as for
the in-process engine; only a server without the plugin, which serves full-cache
requests alone, leaves them to be computed from the checkpoint. The seconds are the
client's, streaming (time to first token, then the rest), network included.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

import torch

from kvrag.compression import CompressionSpec
from kvrag.compression.capabilities import Target, check
from kvrag.data.prompt import Prompt
from kvrag.engine_plugin import config as plugin_config
from kvrag.engines.admission import PrefixAdmission
from kvrag.engines.base import Generation
from kvrag.engines.chat import TokenizerMethods
from kvrag.engines.checkpoint import CheckpointSide
from kvrag.engines.served import Timing, request_spec, served_cost

K = TypeVar("K")


class ServerUnavailableError(RuntimeError):
    """The URL does not answer as an SGLang server."""


class SGLangURLEngine(TokenizerMethods):
    name = "sglang-url"

    def __init__(self, url: str, model_path: str | Path, api_key: str | None = None,
                 timeout_s: float = 3600) -> None:
        self.url = url.rstrip("/")
        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retried_alone = 0
        side = CheckpointSide.load(self.model_path)
        self.tokenizer, self.stop_ids = side.tokenizer, side.stop_ids
        self.info = server_info(self.url, api_key)
        self.plugin = self.info.get("attention_backend") == "kvrag"
        dtype = _dtype(self.info.get("dtype"), getattr(side.config, "torch_dtype", None))
        self.kv_bytes_per_token = side.kv.bytes_per_token(dtype)

    def _headers(self) -> dict[str, str]:
        return _headers(self.api_key)

    def check_servable(self, spec: CompressionSpec) -> None:
        check_servable(self.url, self.info, spec)

    def generate(
        self, prompt: Prompt, max_new_tokens: int, compression: CompressionSpec | None = None,
    ) -> Generation:
        enc = self.encode(prompt)
        params: dict = {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                        "stop_token_ids": sorted(self.stop_ids)}
        sent = request_spec(enc, compression)
        if sent is not None:
            self.check_servable(sent)
        if self.plugin:
            params["custom_params"] = {
                plugin_config.PARAM_SPEC: sent.name if sent else "none",
                plugin_config.PARAM_SPAN: list(enc.span)}
        body = json.dumps({"input_ids": enc.input_ids, "sampling_params": params,
                           "stream": True}).encode()
        request = urllib.request.Request(self.url + "/generate", body, self._headers())
        t0 = time.perf_counter()
        first, last = None, {}
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                for raw in response:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    first = first or time.perf_counter()
                    last = json.loads(line[len("data:"):])
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.url} refused the request ({e.code}): "
                               f"{e.read().decode(errors='replace')[:500]}") from None
        t1 = time.perf_counter()
        if "error" in last:
            raise RuntimeError(f"{self.url}: {last['error']}")
        finish = last.get("meta_info", {}).get("finish_reason") or {}
        if finish.get("type") == "abort":
            raise RuntimeError(f"{self.url} aborted the request: {finish.get('message')}")
        ids = [i for i in last.get("output_ids", []) if i not in self.stop_ids]
        timing = Timing(prefill_s=(first or t1) - t0, decode_s=t1 - (first or t1))
        cost = served_cost(enc, compression, last.get("meta_info", {}), timing, len(ids),
                           self.kv_bytes_per_token)
        return Generation(self.tokenizer.decode(ids, skip_special_tokens=True), cost,
                          truncated=finish.get("type") == "length")

    def close(self) -> None:
        """Nothing to close: every request is its own HTTP connection."""

    def release(self) -> None:
        """Nothing to drop: the server's radix cache keeps prefixes for whoever asks."""

    def generate_many(
        self, jobs: Iterable[tuple[K, Prompt, CompressionSpec | None]], max_new_tokens: int,
        concurrency: int,
    ) -> Iterator[tuple[K, Generation]]:
        """Up to ``concurrency`` requests in flight; each (key, answer) as it lands. Jobs
        with one prompt wait for its first uncompressed one (``PrefixAdmission``), so a
        server (or sglang-router's cache-aware routing) can reuse its prefill."""
        admission = PrefixAdmission(jobs)
        with ThreadPoolExecutor(concurrency) as pool:
            in_flight: dict[Future, tuple[K, Prompt, CompressionSpec | None]] = {}

            def top_up() -> None:
                while len(in_flight) < concurrency and (job := admission.next()) is not None:
                    in_flight[pool.submit(self.generate, job[1], max_new_tokens, job[2])] = job

            top_up()
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    admission.done(job)  # without streaming, done is the first sign
                    yield job[0], future.result()
                top_up()


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def server_info(url: str, api_key: str | None = None) -> dict:
    """The server's ``/server_info`` (older servers: ``/get_server_info``)."""
    url = url.rstrip("/")
    for path in ("/server_info", "/get_server_info"):
        request = urllib.request.Request(url + path, headers=_headers(api_key))
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise ServerUnavailableError(
                    f"{url} refused the request ({e.code}): pass its --api-key") from None
        except (OSError, ValueError) as e:
            raise ServerUnavailableError(
                f"cannot reach an SGLang server at {url}: {e}") from None
    raise ServerUnavailableError(f"{url} has no /server_info: is it an SGLang server?")


def check_servable(url: str, info: dict, spec: CompressionSpec) -> None:
    """Refuse a compressed system where the server does not run the kvrag plugin."""
    if info.get("attention_backend") != "kvrag":
        raise ValueError(
            f"{url} does not run the kvrag plugin (attention backend "
            f"{info.get('attention_backend')!r}), so it cannot serve {spec.name}; full and "
            "rag:* systems work there, or start the server with kvrag serve")
    check(spec, Target.PLUGIN)


def _dtype(server: object, config: object) -> torch.dtype:
    """The server's model dtype where it names one, else the checkpoint's, else float32."""
    for name in (server, config):
        name = str(name).removeprefix("torch.") if name is not None else ""
        if name in ("float32", "bfloat16", "float16"):
            return getattr(torch, name)
    return torch.float32
