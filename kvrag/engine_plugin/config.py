"""How a server and each request choose compression.

Server default: the environment variable ``KVRAG_COMPRESSION`` (``snapkv:0.5``), read in
every SGLang process (``kvrag serve --compression`` sets it). A request may override it
with ``custom_params`` in its sampling parameters (the OpenAI API passes them through
``extra_body={"custom_params": ...}``):

- ``kvrag_compression``: a spec, or ``"none"`` for a full cache;
- ``kvrag_span``: ``[start, end)`` token positions that may be evicted. Without it, all
  but the last ``PROTECTED_TAIL`` prompt tokens may be (the question and the chat-template
  tail of a corpus-in-context prompt sit there). ``kvrag compare --engine sglang`` passes
  the documents' exact span, so both engines evict from the same tokens. A ``once:`` spec
  needs it: the corpus prefix that is compressed once and shared is ``[0, end)``.

sglang-router rebuilds ``/generate`` bodies from its own typed fields and drops
``custom_params``, but forwards ``extra_key``. So the same parameters may come as
``extra_key = "kvrag:" + JSON object`` (``routed_params``); the plugin reads them there and
clears the key before SGLang matches the prefix, so a request's cache is what it would be
with ``custom_params``. ``kvrag compare --engine sglang-url`` always sends them that way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrag.compression import CompressionSpec, SpecError, parse_spec, split_specs
from kvrag.compression.capabilities import Target, check

if TYPE_CHECKING:
    from kvrag.engine_plugin.once import OnceRequest

ENV_COMPRESSION = "KVRAG_COMPRESSION"
ENV_INNER_BACKEND = "KVRAG_INNER_BACKEND"
ENV_STATS = "KVRAG_PLUGIN_STATS"  # a JSONL file: one line per compressed request
ENV_RECORD_KEPT = "KVRAG_PLUGIN_RECORD_KEPT"  # "1": the stats lines list kept token indices
# a JSONL file: before each decode step, the KV slots in use and the requests decoding
# (``kvrag bench serving --shared-corpus`` reads the peak)
ENV_POOL_LOG = "KVRAG_PLUGIN_POOL_LOG"
# "all", or how many of each prompt's last queries prefill keeps (default: what the server
# spec's method reads, at least 64). "all" lets requests ask for h2o.
ENV_CAPTURE = "KVRAG_CAPTURE_QUERIES"
# "python" or "inner": who decodes batches without a per-layer-budget request (backend.py)
ENV_DECODE_PATH = "KVRAG_DECODE_PATH"
# Comma-separated specs (and "none") that requests may ask for; unset: any servable one.
ENV_ALLOWED = "KVRAG_ALLOWED_REQUEST_SPECS"
PARAM_SPEC = "kvrag_compression"
PARAM_SPAN = "kvrag_span"
EXTRA_KEY_PREFIX = "kvrag:"  # an ``extra_key`` that carries the parameters (routed_params)
# meta_info key of the plugin's report on each response: a one-item list of what the
# request's prompt holds in the pool at decode start (``kv_tokens`` slots, ``kv_bytes``)
# and, for a compressed request, what compression kept and freed
REPORT_KEY = "kvrag"
# SnapKV's observation window is 64 tokens and is always kept; this tail is the same.
PROTECTED_TAIL = 64
DEFAULT_CAPTURE = 64  # SnapKV/PyramidKV's window, TOVA's last query


@contextmanager
def engine_environ(values: dict[str, str]) -> Iterator[None]:
    """Set plugin variables while an in-process SGLang engine starts, then restore them.

    SGLang's scheduler processes read their settings from the environment they inherit at
    start, so there is no per-engine channel; the variables are process-wide while set.
    """
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def server_spec() -> CompressionSpec | None:
    """The server-wide spec from ``KVRAG_COMPRESSION``; raises SpecError if it is invalid."""
    text = os.environ.get(ENV_COMPRESSION, "").strip()
    if not text or text.lower() == "none":
        return None
    try:
        spec = parse_spec(text)
    except SpecError as err:
        raise SpecError(f"{ENV_COMPRESSION}={text!r}: {err}") from None
    check(spec, Target.PLUGIN)
    return spec


def allowed_request_specs() -> set[str] | None:
    """The spec names requests may choose from ``KVRAG_ALLOWED_REQUEST_SPECS`` (None: any)."""
    text = os.environ.get(ENV_ALLOWED, "").strip()
    if not text:
        return None
    names = set()
    for item in split_specs(text):
        names.add("none" if item.lower() == "none" else parse_spec(item).name)
    return names


def capture_queries(spec: CompressionSpec | None) -> int | None:
    """Prompt queries kept per request and layer at prefill; None keeps them all."""
    text = os.environ.get(ENV_CAPTURE, "").strip().lower()
    if text == "all":
        return None
    if text:
        if not text.isdigit() or int(text) < 1:
            raise SpecError(f"{ENV_CAPTURE}={text!r}: use 'all' or a whole number >= 1")
        return int(text)
    if spec is None:
        return DEFAULT_CAPTURE
    needed = spec.build().queries_needed()
    return None if needed is None else max(needed, DEFAULT_CAPTURE)


def python_decode(inner: str) -> bool:
    """Whether every decode batch runs in the plugin's Python path. Default: over
    torch_native only, where ``kvrag bench serving`` measures it faster on a CPU."""
    text = os.environ.get(ENV_DECODE_PATH, "").strip().lower()
    if text not in ("", "python", "inner"):
        raise SpecError(f"{ENV_DECODE_PATH}={text!r}: use 'python' or 'inner'")
    return text == "python" if text else inner == "torch_native"


@dataclass(frozen=True)
class Settings:
    """Everything the plugin reads from its environment, read once per process (when the
    backend is created): a request's spec is parsed once, from its own parameters."""

    server_spec: CompressionSpec | None = None
    allowed: set[str] | None = None  # spec names requests may ask for; None: any
    capture: int | None = DEFAULT_CAPTURE  # prompt queries kept per request; None: all
    stats_path: str | None = None
    record_kept: bool = False
    pool_log: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        """Raises SpecError naming the variable that holds an invalid value."""
        spec = server_spec()
        return cls(spec, allowed_request_specs(), capture_queries(spec),
                   os.environ.get(ENV_STATS) or None, os.environ.get(ENV_RECORD_KEPT) == "1",
                   os.environ.get(ENV_POOL_LOG) or None)


@dataclass
class RequestCompression:
    """A request's compression, the one kvrag attribute SGLang's ``Req`` carries
    (``req.kvrag``); ``once`` is set for a ``once:`` spec (``once.py``)."""

    spec: CompressionSpec
    span: tuple[int, int]  # evictable token positions, half-open
    once: OnceRequest | None = None


def routed_params(params: dict) -> str:
    """The ``extra_key`` that carries ``params`` (``PARAM_SPEC``, ``PARAM_SPAN``) through
    sglang-router, which forwards that field and drops ``custom_params``."""
    return EXTRA_KEY_PREFIX + json.dumps(params, separators=(",", ":"))


def request_params(custom_params: dict | None, extra_key: str | None,
                   ) -> tuple[dict | None, str | None]:
    """(the request's kvrag parameters, the ``extra_key`` it keeps): those that came in
    ``extra_key`` (``routed_params``) or else its ``custom_params``. Raises SpecError for a
    malformed key or parameters in both places."""
    if not isinstance(extra_key, str) or not extra_key.startswith(EXTRA_KEY_PREFIX):
        return custom_params, extra_key
    try:
        routed = json.loads(extra_key[len(EXTRA_KEY_PREFIX):])
    except ValueError:
        routed = None
    if not isinstance(routed, dict):
        raise SpecError(f"extra_key {extra_key[:80]!r} starts with {EXTRA_KEY_PREFIX!r} but "
                        "is not followed by a JSON object of kvrag parameters")
    if isinstance(custom_params, dict) and (PARAM_SPEC in custom_params
                                            or PARAM_SPAN in custom_params):
        raise SpecError("kvrag parameters came both in custom_params and in extra_key; "
                        "send them in one place")
    return routed, None


def for_request(custom_params: dict | None, n_prompt: int,
                settings: Settings | None = None) -> RequestCompression | None:
    """This request's compression, or None (no spec, or nothing evictable).

    Raises SpecError for an invalid spec or span, naming the parameter. ``settings``:
    the server's (default: read from the environment now).
    """
    settings = settings or Settings.from_env()
    params = custom_params or {}
    if not isinstance(params, dict):
        raise SpecError(f"custom_params must be an object, got {type(params).__name__}")
    text = params.get(PARAM_SPEC)
    if text is None:
        spec = settings.server_spec
    elif str(text).strip().lower() == "none":
        spec = None
    else:
        try:
            spec = parse_spec(str(text))
        except SpecError as err:
            raise SpecError(f"custom_params.{PARAM_SPEC}={text!r}: {err}") from None
        check(spec, Target.PLUGIN)
    allowed = settings.allowed if text is not None else None
    if allowed is not None and (spec.name if spec else "none") not in allowed:
        raise SpecError(f"custom_params.{PARAM_SPEC}={text!r} is not allowed on this server; "
                        f"allowed: {', '.join(sorted(allowed))}")
    if spec is None:
        return None
    if PARAM_SPAN in params:
        span = params[PARAM_SPAN]
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) for x in span)
                or not 0 <= span[0] <= span[1] <= n_prompt):
            raise SpecError(f"custom_params.{PARAM_SPAN}={span!r} must be [start, end] with "
                            f"0 <= start <= end <= {n_prompt} (the prompt's length)")
        start, end = int(span[0]), int(span[1])
    elif spec.once:
        raise SpecError(f"{spec.name} needs custom_params.{PARAM_SPAN}: the corpus prefix "
                        "compressed once and shared by every question over it ends where the "
                        "span ends")
    else:
        start, end = 0, max(0, n_prompt - PROTECTED_TAIL)
    if spec.once and end >= n_prompt:
        raise SpecError(f"{spec.name}: custom_params.{PARAM_SPAN} must end before the prompt "
                        "does; the tokens after it are the question")
    if end - start < 1 or spec.keeps_all(end - start):
        return None
    return RequestCompression(spec, (start, end))
