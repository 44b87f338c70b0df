"""The URL engine's client side against a loopback stand-in for an SGLang server or a router:
what a request carries, which failures are sent again, and that a cut stream is never an
answer. (The real server and router: tests/bench/test_fleet.py.)"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvrag.compression import parse_spec
from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance
from kvrag.engine_plugin import config as plugin_config
from kvrag.engines.sglang_url import (
    ROUTING_KEY_HEADER,
    ServerUnavailableError,
    SGLangURLEngine,
)

INSTANCE = Instance("q0", "Where was Ana 1 born?", ["Town 1"],
                    [Doc(f"d{j}", f"Town {j}", f"Ana {j} was born in Town {j}.")
                     for j in range(3)], ["d1"])
DONE = {"output_ids": [42, 43], "meta_info": {"finish_reason": {"type": "stop"}, "kvrag": [
    {"kv_tokens": 90, "kv_bytes": 900, "layer_mean_kv_tokens": 90.0}]}}
CUT = {"output_ids": [42], "meta_info": {"finish_reason": None}}


@contextmanager
def stand_in(replies: list, info: dict | None = None,
             router: bool = False) -> Iterator[tuple[str, list[dict]]]:
    """``/generate`` answers with ``replies`` in turn: a list of stream events, or an int
    (that HTTP status). ``router``: no ``/server_info``, a router's ``/get_server_info``,
    and each reply's meta_info passed through. Yields the URL and the requests it got."""
    seen: list[dict] = []
    info = info or {"attention_backend": "kvrag", "dtype": "float32"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/server_info" and not router:
                self._send(200, json.dumps(info).encode())
            elif self.path == "/get_server_info" and router:
                self._send(200, b'{"router_manager": true, "workers_count": 2}')
            else:
                self._send(404, b"")

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
            if not body.get("stream"):  # the router probe
                self._send(200, json.dumps(DONE).encode())
                return
            reply = replies.pop(0)
            if isinstance(reply, int):
                self._send(reply, b'{"error": "worker gone"}')
                return
            self._send(200, b"".join(b"data: " + json.dumps(e).encode() + b"\n\n"
                                     for e in reply))

        def _send(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()


def engine(url: str, model_dir, retries: int = 3) -> SGLangURLEngine:
    return SGLangURLEngine(url, model_dir, retries=retries, backoff_s=0.01)


def test_parameters_travel_in_extra_key_with_the_corpus_as_routing_key(tiny_model_dir):
    with stand_in([[DONE]]) as (url, seen):
        eng = engine(url, tiny_model_dir)
        eng.generate(build_prompt(INSTANCE), 4)
    (sent,) = seen
    enc = eng.encode(build_prompt(INSTANCE))
    assert "custom_params" not in sent["body"]["sampling_params"]
    params, _ = plugin_config.request_params(None, sent["body"]["extra_key"])
    assert params == {"kvrag_compression": "none", "kvrag_span": list(enc.span)}
    # the same corpus gives the same key, whatever the question
    other = Instance("q1", "Where was Ana 2 born?", ["Town 2"], INSTANCE.docs, ["d2"])
    with stand_in([[DONE]]) as (url, seen_other):
        engine(url, tiny_model_dir).generate(build_prompt(other), 4)
    key = sent["headers"][ROUTING_KEY_HEADER.lower()]
    assert len(key) == 16 and seen_other[0]["headers"][ROUTING_KEY_HEADER.lower()] == key


def test_a_cut_stream_or_a_lost_worker_is_sent_again(tiny_model_dir):
    with stand_in([[CUT], 503, [DONE]]) as (url, seen):
        eng = engine(url, tiny_model_dir)
        generation = eng.generate(build_prompt(INSTANCE), 4)
    assert len(seen) == 3 and eng.resent == 2
    assert generation.cost.kv_tokens == 90 and not generation.truncated


def test_a_stream_that_never_finishes_is_never_an_answer(tiny_model_dir):
    with stand_in([[CUT]] * 3) as (url, seen):
        eng = engine(url, tiny_model_dir, retries=2)
        with pytest.raises(ServerUnavailableError, match="without a finish reason .sent 3"):
            eng.generate(build_prompt(INSTANCE), 4)
    assert len(seen) == 3


@pytest.mark.parametrize("reply", [400, [{"error": {"message": "bad spec",
                                                    "retryable": False}}]])
def test_a_refusal_is_not_sent_again(tiny_model_dir, reply):
    with stand_in([reply, [DONE]]) as (url, seen):
        eng = engine(url, tiny_model_dir)
        with pytest.raises(RuntimeError) as err:
            eng.generate(build_prompt(INSTANCE), 4)
    assert not isinstance(err.value, ServerUnavailableError)
    assert len(seen) == 1 and eng.resent == 0


def test_behind_a_router_a_short_request_shows_the_plugin(tiny_model_dir):
    with stand_in([[DONE]], router=True) as (url, seen):
        eng = engine(url, tiny_model_dir)
        assert eng.info["router"] and eng.plugin
        eng.check_servable(parse_spec("snapkv:0.5"))  # allowed: the worker runs the plugin
    assert seen[0]["body"]["sampling_params"]["max_new_tokens"] == 2


def test_a_server_without_the_plugin_gets_no_kvrag_parameters(tiny_model_dir):
    with stand_in([[{"output_ids": [7], "meta_info": {"finish_reason": {"type": "stop"}}}]],
                  info={"attention_backend": "triton"}) as (url, seen):
        eng = engine(url, tiny_model_dir)
        eng.generate(build_prompt(INSTANCE), 4)
        with pytest.raises(ValueError, match="does not run the kvrag plugin"):
            eng.check_servable(parse_spec("snapkv:0.5"))
    assert "extra_key" not in seen[0]["body"]


def test_a_request_left_uncompressed_is_asked_again_alone(tiny_model_dir):
    """A server whose pool was too full to compact answers a compressed request with a
    full cache; that answer is dropped and the request sent again after the others."""
    compressed = {"output_ids": [5], "meta_info": {"finish_reason": {"type": "stop"},
                  "kvrag": [{"spec": "snapkv:0.5", "kv_tokens": 40, "kv_bytes": 400,
                             "layer_mean_kv_tokens": 40.0, "seconds": 0.1}]}}
    with stand_in([[DONE], [compressed]]) as (url, seen):
        eng = engine(url, tiny_model_dir)
        jobs = [("q0", build_prompt(INSTANCE), parse_spec("snapkv:0.5"))]
        answers = dict(eng.generate_many(iter(jobs), 4, concurrency=2))
    assert len(seen) == 2 and eng.retried_alone == 1 and eng.resent == 0
    assert answers["q0"].cost.kv_tokens == 40
