"""An answer's cost as an SGLang server reports it, for the in-process and the URL engine.

A server running the kvrag plugin reports with every response (``meta_info["kvrag"]``)
the pool slots its prompt holds when decoding starts and their bytes, read from the pool
itself, and, for a compressed request, what compression kept. Both engines build the
same ``Cost`` from it, so an answer's memory is what the server held, however it was
reached. Only a server without the plugin (full-cache requests only) leaves the KV
figures to be computed from the checkpoint's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrag.compression import CompressionSpec
from kvrag.engine_plugin import config as plugin_config
from kvrag.engines.base import Cost
from kvrag.engines.chat import EncodedPrompt


class UncompressedError(RuntimeError):
    """The plugin could not compress a request that asked for it (its log says why)."""


def report_of(meta_info: dict) -> dict | None:
    """The plugin's report in a response's ``meta_info``, or None (no plugin there)."""
    reports = meta_info.get(plugin_config.REPORT_KEY) or []
    return reports[0] if reports else None


def request_spec(enc: EncodedPrompt, compression: CompressionSpec | None,
                 ) -> CompressionSpec | None:
    """The spec a request is sent with: none where a budget covers every document token,
    as the HF engine does (the answer is recorded as ``served_uncompressed``)."""
    if compression is not None and compression.keeps_all(enc.context_end - enc.context_start):
        return None
    return compression


@dataclass(frozen=True)
class Timing:
    prefill_s: float  # time to the first token (compression included)
    decode_s: float


def served_cost(enc: EncodedPrompt, asked: CompressionSpec | None, meta_info: dict,
                timing: Timing, new_tokens: int, plain_bytes_per_token: int) -> Cost:
    """``asked``: the system's spec; ``plain_bytes_per_token``: the checkpoint's KV bytes
    per token, used only where the server has no plugin (so nothing is compressed)."""
    sent = request_spec(enc, asked)
    report = report_of(meta_info)
    n, n_doc = len(enc.input_ids), enc.context_end - enc.context_start
    compressed = report is not None and "spec" in report
    if sent is not None and not compressed:
        raise UncompressedError(f"SGLang left the {sent.name} request uncompressed (its log "
                                "says why); its answer would be a full-cache one")
    if sent is None and compressed:
        raise RuntimeError(f"SGLang compressed ({report['spec']}) a request sent for a full "
                           "cache: its kvrag parameters did not reach the plugin")
    if report is None:
        kv_tokens, kv_bytes, layer_mean = n, n * plain_bytes_per_token, float(n)
    else:
        kv_tokens, kv_bytes = int(report["kv_tokens"]), int(report["kv_bytes"])
        layer_mean = float(report["layer_mean_kv_tokens"])
    seconds = float(report.get("seconds", 0.0)) if compressed else 0.0
    recall_s = float(report.get("recall_seconds", 0.0)) if compressed else 0.0
    if compressed and "prefill_tokens" in report:
        prefilled = int(report["prefill_tokens"])
    else:
        prefilled = int(meta_info.get("prompt_tokens", n)) - int(meta_info.get("cached_tokens", 0))
    # a full cache can share the whole corpus prefix; per-question compression nothing
    shared = float(enc.context_end if sent is None else report.get("shared_kv_tokens", 0.0))
    return Cost(
        prompt_tokens=n, kv_tokens=float(kv_tokens), kv_bytes=kv_bytes,
        prefill_s=timing.prefill_s - seconds - recall_s, compress_s=seconds,
        decode_s=timing.decode_s, recall_s=recall_s,
        recalled_tokens=float(report.get("recalled_tokens", 0)) if compressed else 0.0,
        host_kv_bytes=int(report.get("host_kv_bytes", 0)) if compressed else 0,
        new_tokens=new_tokens, attended_tokens=float(kv_tokens), doc_tokens=n_doc,
        prefill_tokens=prefilled, shared_kv_tokens=shared, layer_mean_kv_tokens=layer_mean,
        served_uncompressed=asked is not None and sent is None,
    )
