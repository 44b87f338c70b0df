"""Greedy generation against an SGLang deployment that is already running, by URL.

The deployment may be a ``kvrag serve``, a plain SGLang server, or sglang-router in front
of many. Prompts are encoded here with the local tokenizer of ``--model`` (the same chat
template and document span as the other engines) and sent as token ids to ``/generate``.
Compressed systems need the kvrag plugin there: ``/server_info`` says which attention
backend the server runs, and a server without it gets only full-cache requests. A router
has no ``/server_info`` of its workers; a short request through it shows whether the
worker that answers runs the plugin, and every answer is checked again (``served.py``).

Through a router:

- kvrag's parameters travel in ``extra_key`` (``config.routed_params``): the router drops
  ``custom_params``;
- ``X-SMG-Routing-Key`` names the corpus (a digest of the prompt up to the documents' end),
  for the router's ``manual`` policy, which sends one key to one worker;
- a request whose connection fails, whose status is 500/502/503/504, or whose stream ends
  without a finish reason (a worker lost mid-answer) is sent again to the same URL, up to
  ``retries`` times with a growing pause; it is never taken as an answer.

The KV slots and bytes an answer held are the server's report (``served.py``), as for
the in-process engine; only a server without the plugin, which serves full-cache
requests alone, leaves them to be computed from the checkpoint. The seconds are the
client's, streaming (time to first token, then the rest), network included.
"""

from __future__ import annotations

import hashlib
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
from kvrag.engines.served import (
    Timing,
    UncompressedError,
    report_of,
    request_spec,
    served_cost,
)

K = TypeVar("K")

ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
RETRY_STATUSES = (500, 502, 503, 504)


class ServerUnavailableError(RuntimeError):
    """The URL does not answer as an SGLang server."""


class _Transient(Exception):
    """A request lost on its way (a worker gone, a stream cut): worth sending again."""


class SGLangURLEngine(TokenizerMethods):
    name = "sglang-url"

    def __init__(self, url: str, model_path: str | Path, api_key: str | None = None,
                 timeout_s: float = 3600, retries: int = 5, backoff_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.retried_alone = 0
        self.resent = 0  # requests sent again after a transient failure
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
        body: dict = {"input_ids": enc.input_ids, "sampling_params": params, "stream": True}
        if self.plugin:
            body["extra_key"] = plugin_config.routed_params({
                plugin_config.PARAM_SPEC: sent.name if sent else "none",
                plugin_config.PARAM_SPAN: list(enc.span)})
        corpus = corpus_key(enc.input_ids[:enc.context_end])
        headers = self._headers() | {ROUTING_KEY_HEADER: corpus}
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            try:
                last, timing = self._stream(data, headers)
                break
            except _Transient as e:
                if attempt == self.retries:
                    raise ServerUnavailableError(
                        f"{self.url}: {e} (sent {attempt + 1} times)") from None
                self.resent += 1
                time.sleep(self.backoff_s * 2 ** attempt)
        finish = last["meta_info"]["finish_reason"]
        if finish.get("type") == "abort":
            raise RuntimeError(f"{self.url} aborted the request: {finish.get('message')}")
        ids = [i for i in last.get("output_ids", []) if i not in self.stop_ids]
        cost = served_cost(enc, compression, last["meta_info"], timing, len(ids),
                           self.kv_bytes_per_token)
        return Generation(self.tokenizer.decode(ids, skip_special_tokens=True), cost,
                          truncated=finish.get("type") == "length")

    def _stream(self, data: bytes, headers: dict[str, str]) -> tuple[dict, Timing]:
        """The stream's last event, which carries a finish reason, and its timing. Raises
        _Transient where the request was lost on its way, RuntimeError where it was refused."""
        request = urllib.request.Request(self.url + "/generate", data, headers)
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
            message = f"({e.code}): {e.read().decode(errors='replace')[:500]}"
            if e.code in RETRY_STATUSES:
                raise _Transient(f"the request failed {message}") from None
            raise RuntimeError(f"{self.url} refused the request {message}") from None
        except TimeoutError:
            raise RuntimeError(f"{self.url} gave no answer in {self.timeout_s:.0f} s") from None
        except (OSError, ValueError) as e:  # connection refused or reset, a cut JSON line
            raise _Transient(f"the connection failed: {e}") from None
        t1 = time.perf_counter()
        if "error" in last:
            error = last["error"]
            if isinstance(error, dict) and error.get("retryable") is False:
                raise RuntimeError(f"{self.url}: {error.get('message', error)}")
            raise _Transient(f"the stream ended with an error: {error}")
        if not (last.get("meta_info") or {}).get("finish_reason"):
            raise _Transient("the stream ended without a finish reason")
        return last, Timing(prefill_s=(first or t1) - t0, decode_s=t1 - (first or t1))

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
        server (or sglang-router's cache-aware routing) can reuse its prefill. A request
        the server could not compress (its pool too full to compact) is asked again alone
        at the end, as the in-process engine does."""
        admission = PrefixAdmission(jobs)
        again: list[tuple[K, Prompt, CompressionSpec | None]] = []
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
                    if isinstance(future.exception(), UncompressedError):
                        again.append(job)
                        continue
                    yield job[0], future.result()
                top_up()
        for key, prompt, compression in again:
            self.retried_alone += 1
            yield key, self.generate(prompt, max_new_tokens, compression)


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def corpus_key(prefix_ids: list[int]) -> str:
    """A short digest of a prompt's ids up to the documents' end: one key per corpus."""
    return hashlib.sha256(json.dumps(prefix_ids).encode()).hexdigest()[:16]


def server_info(url: str, api_key: str | None = None) -> dict:
    """The server's ``/server_info`` (older servers: ``/get_server_info``). Behind
    sglang-router (``router_manager`` in its ``/get_server_info``), the answer to a
    short request says whether the worker it reached runs the plugin: its
    ``attention_backend`` is then "kvrag", and ``router`` is true."""
    url = url.rstrip("/")
    for path in ("/server_info", "/get_server_info"):
        request = urllib.request.Request(url + path, headers=_headers(api_key))
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                info = json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise ServerUnavailableError(
                    f"{url} refused the request ({e.code}): pass its --api-key") from None
            continue
        except (OSError, ValueError) as e:
            raise ServerUnavailableError(
                f"cannot reach an SGLang server at {url}: {e}") from None
        return _behind_router(url, api_key, info) if info.get("router_manager") else info
    raise ServerUnavailableError(f"{url} has no /server_info: is it an SGLang server?")


def _behind_router(url: str, api_key: str | None, info: dict) -> dict:
    body = json.dumps({"input_ids": [0, 0, 0, 0], "sampling_params": {
        "max_new_tokens": 2, "ignore_eos": True}}).encode()
    request = urllib.request.Request(url + "/generate", body, _headers(api_key))
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            meta_info = json.loads(response.read()).get("meta_info", {})
    except urllib.error.HTTPError as e:
        raise ServerUnavailableError(
            f"the router at {url} refused a short request ({e.code}): "
            f"{e.read().decode(errors='replace')[:300]}") from None
    except (OSError, ValueError) as e:
        raise ServerUnavailableError(f"the router at {url} did not answer: {e}") from None
    backend = "kvrag" if report_of(meta_info) is not None else "unknown (behind a router)"
    return info | {"router": True, "attention_backend": backend}


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
