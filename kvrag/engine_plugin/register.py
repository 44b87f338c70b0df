"""The plugin's entry point: SGLang calls ``register()`` in each of its processes.

Entry point group ``sglang.srt.plugins`` (pyproject.toml). ``register`` adds the
``kvrag`` attention backend and the ``kvrag-cost`` radix eviction policy to SGLang's
registries and CLI choices, and the hooks that tie compression to the scheduler:

- ``Req.__init__`` (after): read the request's compression (``config.for_request``); a
  compressed request is kept out of the radix tree (``skip_radix_cache_insert``), an
  invalid spec aborts the request with the reason;
- ``Req._compute_max_prefix_len`` (after): a compressed request recomputes at least the
  prompt queries its method scores with, even when the radix tree holds the prefix;
- ``ScheduleBatch.prepare_for_extend`` (after): the backend learns which requests of the
  coming prefill batch will be compressed, and keeps prompt queries for those only;
- ``process_batch_result_prefill`` (around) and ``SchedulerOutputStreamer.stream_output``
  (before): a request whose last prefill chunk just ran is compressed once SGLang has
  processed the batch's results and before they stream, and its spare slots go back to
  the allocator before the next batch; every request's report (the slots its prompt
  holds, their bytes, what compression kept and freed) rides in its ``customized_info``,
  which SGLang returns as ``meta_info["kvrag"]`` (``is_request_level_customized_info_key``
  (after) makes it one value per request);
- ``Scheduler.get_new_batch_prefill`` (before): after a compaction freed slots, the
  scheduler looks for requests to admit again (it stops once a batch could not take one,
  until a request leaves);
- ``BasePrefixCache.free_kv_row`` (around): releasing a compressed request frees its
  compacted slots instead of the prompt positions they replaced;
- ``kv_private_tokens`` (after): SGLang's memory invariant checker counts a compressed
  request's slots as it holds them, so its leak checks
  (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``) verify the compaction's accounting;
- compress-once (``once.py``): ``Req.init_next_round_input`` (around) matches a ``once:``
  request against its stored compressed corpus, or sets it up to build one;
  ``PrefillAdder._select_prefill_admission`` (after) and ``add_chunked_req`` (before) end
  a building request's chunk where its corpus prefix ends, so the prefix is compressed
  before the question runs; the release hook stores the compressed prefix in the tree.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import types

from kvrag.compression import SpecError
from kvrag.compression.sentences import sentence_ends_for
from kvrag.compression.spec import SENTENCE
from kvrag.engine_plugin import config, hooks

logger = logging.getLogger(__name__)

BACKEND_NAME = "kvrag"
_REGISTERED = False

_REQ_INIT = "sglang.srt.managers.schedule_batch.Req.__init__"
_PREFILL_DONE = ("sglang.srt.managers.scheduler_components.batch_result_processor."
                 "SchedulerBatchResultProcessor.process_batch_result_prefill")
_FREE_ROW = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row"
_MAX_PREFIX = "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len"
_PRIVATE_TOKENS = "sglang.srt.managers.scheduler_components.pool_stats_observer.kv_private_tokens"
_PREPARE_EXTEND = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend"
_NEW_PREFILL = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"
_NEXT_ROUND = "sglang.srt.managers.schedule_batch.Req.init_next_round_input"
_ADMISSION = "sglang.srt.managers.schedule_policy.PrefillAdder._select_prefill_admission"
_CHUNKED = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"
_DECODE_DONE = ("sglang.srt.managers.scheduler_components.batch_result_processor."
                "SchedulerBatchResultProcessor.process_batch_result_decode")
_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
_STREAM = _STREAMER + ".stream_output"
_REQUEST_LEVEL = _STREAMER + ".is_request_level_customized_info_key"
_HOOK_TARGETS = (_REQ_INIT, _MAX_PREFIX, _PREPARE_EXTEND, _PREFILL_DONE, _FREE_ROW,
                 _PRIVATE_TOKENS, _NEW_PREFILL, _NEXT_ROUND, _ADMISSION, _CHUNKED, _STREAM,
                 _REQUEST_LEVEL)
# inner backends that take their rows and lengths from the forward batch, so that the
# physical rows of compacted requests reach their kernels (see backend.py)
INNER_BACKENDS = ("torch_native", "triton")


def register() -> None:
    """Idempotent: registries, CLI choices and hooks are added once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    _supply_vllm_rotary_import()

    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    from kvrag.engine_plugin.eviction import register_eviction_policy

    register_eviction_policy()

    hooks.install([
        (_REQ_INIT, _after_req_init, "after"),
        (_MAX_PREFIX, _after_max_prefix_len, "after"),
        (_PREPARE_EXTEND, _after_prepare_for_extend, "after"),
        (_NEW_PREFILL, _before_new_prefill, "before"),
        (_PREFILL_DONE, _around_prefill, "around"),
        (_FREE_ROW, _around_free_kv_row, "around"),
        (_PRIVATE_TOKENS, _after_private_tokens, "after"),
        (_NEXT_ROUND, _around_next_round_input, "around"),
        (_ADMISSION, _after_select_admission, "after"),
        (_CHUNKED, _before_add_chunked_req, "before"),
        (_STREAM, _before_stream_output, "before"),
        (_REQUEST_LEVEL, _after_request_level_key, "after"),
    ])
    if os.environ.get(config.ENV_POOL_LOG):
        hooks.install([(_DECODE_DONE, _before_decode_result, "before")])
    _REGISTERED = True


def _supply_vllm_rotary_import() -> None:
    """Give SGLang's RotaryEmbedding the ``vllm._custom_ops`` import it makes on a CPU.

    Without CUDA, ``RotaryEmbedding.__init__`` imports ``vllm._custom_ops.rotary_embedding``
    although the forward then takes the native path; vllm is not installable beside
    sglang's torch pin. The stand-in raises if it is ever called.
    """
    import torch

    if torch.cuda.is_available() or "vllm" in sys.modules or importlib.util.find_spec("vllm"):
        return

    def rotary_embedding(*args, **kwargs):
        raise NotImplementedError("kvrag's stand-in for vllm._custom_ops.rotary_embedding "
                                  "was called; install vllm for this path")

    package = types.ModuleType("vllm")
    package.__path__ = []
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = rotary_embedding
    package._custom_ops = ops
    sys.modules["vllm"], sys.modules["vllm._custom_ops"] = package, ops
    logger.info("kvrag: no CUDA and no vllm here; supplied a stand-in vllm._custom_ops "
                "(SGLang's RotaryEmbedding imports it on a CPU but runs the native path)")


def create_backend(model_runner):
    """Factory for ``--attention-backend kvrag``; refuses settings it cannot serve."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from kvrag.engine_plugin import backend

    device = str(model_runner.device)
    inner_name = os.environ.get(config.ENV_INNER_BACKEND) or (
        "torch_native" if device == "cpu" else "triton")
    if inner_name not in INNER_BACKENDS or inner_name not in ATTENTION_BACKENDS:
        raise ValueError(f"{config.ENV_INNER_BACKEND}={inner_name!r} is not an attention "
                         f"backend kvrag can wrap; choose one of {', '.join(INNER_BACKENDS)}")
    spec = config.server_spec()  # an invalid KVRAG_COMPRESSION stops the server here
    _refuse_unsupported(model_runner, device)
    capture = config.capture_queries(spec)
    python_decode = config.python_decode(inner_name)
    inner = ATTENTION_BACKENDS[inner_name](model_runner)
    created = backend.KvragAttnBackend(model_runner, inner, capture=capture,
                                       python_decode=python_decode,
                                       shard=_head_shard(model_runner),
                                       tp_size=_tp_size())
    backend.ACTIVE = created
    logger.info("kvrag attention backend over %s (decode: %s); server compression: %s",
                inner_name, "python" if python_decode else "inner",
                spec.name if spec else "none (per request only)")
    return created


def _tp_size() -> int:
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_world_size()


def _head_shard(model_runner):
    """This rank's KV heads, so every tensor-parallel rank selects as one rank would."""
    from sglang.srt.distributed.parallel_state import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        get_tp_group,
    )

    from kvrag.compression import HeadShard

    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return HeadShard()
    rank = get_tensor_model_parallel_rank()
    total = model_runner.model_config.get_total_num_kv_heads()
    local = model_runner.token_to_kv_pool.head_num
    # SGLang splits KV heads evenly, or replicates each over tp_size // total ranks
    offset = rank * local if size <= total else rank // (size // total)
    return HeadShard(offset=offset, total=total,
                     gather=lambda scores: get_tp_group().all_gather(scores.contiguous(), dim=0))


def _refuse_unsupported(model_runner, device: str) -> None:
    """Settings under which a compressed request's cache would be read outside this
    backend's decode (or shared with a draft model): refused, not served wrongly."""
    from sglang.srt.arg_groups.model_override_base import resolved_view
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import get_parallel, get_schedule, get_spec

    refused = {
        "the overlap scheduler (add --disable-overlap-schedule)":
            not get_schedule().disable_overlap_schedule,
        # a replay calls only init_forward_metadata_out_graph, over the graph runner's
        # buffers: compacted requests' physical rows would need capture-stable buffers
        "CUDA graphs (add --disable-cuda-graph)":
            device != "cpu" and not resolved_view(model_runner.server_args).disable_cuda_graph,
        f"page size {model_runner.page_size} (use --page-size 1)": model_runner.page_size != 1,
        "--enable-mixed-chunk": bool(getattr(get_schedule(), "enable_mixed_chunk", False)),
        "speculative decoding": bool(get_spec().speculative_algorithm),
        "DP attention": (get_parallel().attn_dp_size or 1) > 1,
        "sliding-window (SWA) models": isinstance(model_runner.token_to_kv_pool, SWAKVPool),
    }
    problems = [name for name, present in refused.items() if present]
    if problems:
        raise ValueError(f"--attention-backend kvrag compresses between batches and decodes "
                         f"compressed requests itself; it cannot run with {', '.join(problems)}")
    missing = [t for t in _HOOK_TARGETS if t not in HookRegistry._patched]
    if missing:
        raise RuntimeError(f"kvrag hooks were not applied to {missing}; without them freed "
                           f"slots would leak (is sglang the pinned 0.5.23?)")


def _after_req_init(result, req, *args, **kwargs):
    from kvrag.engine_plugin import backend

    if backend.ACTIVE is None:
        return result
    try:
        wanted = config.for_request(req.sampling_params.custom_params, len(req.origin_input_ids))
        if wanted is not None and req.session is not None:
            raise SpecError("compression is not served for session requests: a session "
                            "keeps the request's KV row for its next turn")
        if wanted is not None:
            needed = wanted.spec.build().queries_needed()
            have = backend.ACTIVE.capture
            if have is not None and (needed is None or needed > have):
                raise SpecError(f"{wanted.spec.name} scores with {needed or 'all'} prompt "
                                f"queries but the server keeps {have}; start it with "
                                f"{config.ENV_CAPTURE}=all")
    except (SpecError, TypeError) as err:
        req.set_finish_with_abort(str(err))
        return result
    req.kvrag = wanted
    req.kvrag_once = None
    if wanted is not None:
        req.skip_radix_cache_insert = True
        if wanted.spec.once:
            from kvrag.engine_plugin.once import OnceRequest

            req.kvrag_once = OnceRequest.of(wanted.spec, wanted.span, req.origin_input_ids,
                                            req.extra_key, req.cache_salt)
    return result


def _after_max_prefix_len(result, req, input_len, *args, **kwargs):
    from kvrag.engine_plugin import backend

    if getattr(req, "kvrag", None) is None or backend.ACTIVE is None:
        return result
    once = req.kvrag_once
    if once is not None and once.state == "hit":
        return result  # nothing is scored: the stored prefix is matched whole
    # the queries scored are the prompt's last ones, or the corpus prefix's for once:
    end = once.end if once is not None else input_len
    capture = backend.ACTIVE.capture
    return min(result, 0 if capture is None else max(0, end - capture))


def _around_next_round_input(original, req, tree_cache=None, *args, **kwargs):
    """A fresh ``once:`` request tries its stored compressed prefix first (see once.py)."""
    from array import array

    once = getattr(req, "kvrag_once", None)
    if once is None or tree_cache is None or req.kv.holds_kv:
        return original(req, tree_cache, *args, **kwargs)
    once.state = "hit"
    _set_prompt(req, once.hit_prompt(), namespace_of(once))
    result = original(req, tree_cache, *args, **kwargs)
    if req.prefix_len >= once.kmax:
        return result
    once.state = "miss"
    _set_prompt(req, array("q", once.real), once.extra_key)
    return original(req, tree_cache, *args, **kwargs)


def namespace_of(once) -> str:
    from kvrag.engine_plugin.once import namespace

    return namespace(once.spec, once.extra_key)


def _set_prompt(req, prompt, extra_key) -> None:
    from array import array

    req.origin_input_ids = prompt
    req.extra_key = extra_key
    req.full_untruncated_fill_ids = array("q")  # rebuilt from the prompt when next read


def _after_select_admission(result, adder, req, *args, **kwargs):
    """End a building ``once:`` request's chunk at its corpus prefix."""
    import dataclasses

    once = getattr(req, "kvrag_once", None)
    if once is None or once.state != "miss" or not dataclasses.is_dataclass(result):
        return result
    if result.prefix_len < once.end < result.prefix_len + result.extend_len:
        return dataclasses.replace(result, extend_len=once.end - result.prefix_len,
                                   is_chunked=True, max_new_tokens=0)
    return result


def _before_add_chunked_req(adder, req, *args, **kwargs):
    once = getattr(req, "kvrag_once", None)
    if once is not None and once.state == "miss" and req.prefix_len < once.end:
        limit = once.end - req.prefix_len
        adder.chunked_req_limit = min(adder.chunked_req_limit or limit, limit)


def _after_prepare_for_extend(result, batch, *args, **kwargs):
    from kvrag.engine_plugin import backend

    if backend.ACTIVE is not None:
        backend.ACTIVE.expect_extend(
            [req.kv.req_pool_idx for req in batch.reqs],
            [_scores(req) for req in batch.reqs],
            [req.kvrag_once.shift if _is_hit(req) else 0 for req in batch.reqs])
    return result


def _is_hit(req) -> bool:
    once = getattr(req, "kvrag_once", None)
    return once is not None and once.state == "hit"


def _scores(req) -> bool:
    """Whether the request will be compressed, so its prefill keeps queries."""
    from kvrag.engine_plugin import backend

    return (getattr(req, "kvrag", None) is not None and req.beam_group is None
            and not _is_hit(req) and req.kv.req_pool_idx not in backend.ACTIVE.resident)


def _around_prefill(original, processor, batch, *args, **kwargs):
    """Compress the requests whose prefill just ended, after SGLang processed the batch's
    results and before it streams them (``_before_stream_output``), so the first chunk a
    client receives already carries what the plugin kept (``config.REPORT_KEY``)."""
    from kvrag.engine_plugin import backend

    active = backend.ACTIVE
    if active is None:
        return original(processor, batch, *args, **kwargs)
    # SGLang counts a request's middle chunks down while processing them: read it first
    last_chunk = {id(req) for req in batch.reqs if req.inflight_middle_chunks <= 0}
    active.pending_prefill = (processor, batch, last_chunk)
    try:
        result = original(processor, batch, *args, **kwargs)
    except BaseException:
        active.pending_prefill = None
        raise
    _compress_pending(active)  # a rank or a batch that streamed nothing
    return result


def _before_stream_output(streamer, *args, **kwargs):
    from kvrag.engine_plugin import backend

    if backend.ACTIVE is not None:
        _compress_pending(backend.ACTIVE)


def _compress_pending(active) -> None:
    if active.pending_prefill is None:
        return
    processor, batch, last_chunk = active.pending_prefill
    active.pending_prefill = None
    _compress_prefilled(active, processor, batch, last_chunk)


def _compress_prefilled(active, processor, batch, last_chunk: set[int]) -> None:
    allocator = processor.token_to_kv_pool_allocator
    for req in batch.reqs:
        if not req.kv.holds_kv:
            continue
        row, last = req.kv.req_pool_idx, id(req) in last_chunk
        once = getattr(req, "kvrag_once", None)
        if getattr(req, "kvrag", None) is None or req.beam_group is not None:
            if last:
                active.tails.pop(row, None)  # prefill done, nothing to score
                _report(req, _held(active, len(req.origin_input_ids)), write=False)
            continue
        if once is not None and once.state == "hit":
            if last:
                _report(req, _once_line(active, req, once, "hit",
                                        prefilled=len(once.real) - once.end)
                        | {"seconds": 0.0})
            continue
        if req.finished() or req.is_retracted or row in active.resident:
            continue
        if once is not None:
            # a building once: request is compressed where its corpus prefix ends
            prefilled = active.prefilled(row)
            if prefilled < once.end:
                continue
            if prefilled > once.end:
                logger.error("kvrag: request %s ran past its corpus prefix (%d > %d) before "
                             "it was compressed; left uncompressed", req.rid, prefilled,
                             once.end)
                active.tails.pop(row, None)
                continue
        elif not last:
            continue
        ends = sentence_ends_for(req.kvrag.spec, req.origin_input_ids,
                                 active.tokenizer) if req.kvrag.spec.chunk == SENTENCE else None
        free_before = allocator.available_size()
        done = active.compress(
            row, rid=req.rid, protected=req.kv.cache_protected_len,
            spec=req.kvrag.spec, span=req.kvrag.span, sentence_ends=ends,
            make_room=lambda k: allocator.evict_to_free_tokens(processor.tree_cache, k))
        if done is None:
            continue
        active.room_made = active.room_made or done.freed > done.allocated
        line = _stats_line(active, req.rid, req.kvrag, done, free_before,
                           allocator.available_size())
        if once is not None:
            active.resident[row].once = once  # its kept slots go to the tree on release
            line |= _once_line(active, req, once, "built",
                               prefilled=len(once.real) - req.kv.cache_protected_len)
        _report(req, line)


def _held(active, slots: int, layer_mean: float | None = None) -> dict:
    """What a request's prompt holds in the pool when its decode starts."""
    return {"kv_tokens": slots, "kv_bytes": slots * active.slot_bytes,
            "layer_mean_kv_tokens": float(slots if layer_mean is None else layer_mean)}


def _report(req, line: dict, write: bool = True) -> None:
    """Hand ``line`` to the client with the request's response (a one-item list in
    ``meta_info[config.REPORT_KEY]``, streamed or not) and, if ``write``, to the stats
    file."""
    req.customized_info = (req.customized_info or {}) | {config.REPORT_KEY: [line]}
    if write:
        _write_stats(line)


def _once_line(active, req, once, kind: str, prefilled: int) -> dict:
    """What the engine reports for a once: request: its kept corpus plus its question."""
    question = len(once.real) - once.end
    return {"rid": req.rid, "spec": once.spec.name, "once": kind,
            "prompt_tokens": len(once.real), **_held(active, once.kmax + question),
            "shared_kv_tokens": float(once.kmax), "prefill_tokens": prefilled}


def _after_request_level_key(result, streamer, key, *args, **kwargs):
    """The plugin's report is one value per request, not one per output token."""
    return result or key == config.REPORT_KEY


def _before_new_prefill(scheduler, running_batch, *args, **kwargs):
    from kvrag.engine_plugin import backend

    if backend.ACTIVE is not None and backend.ACTIVE.room_made:
        # SGLang stops admitting once a batch could not take a request, and only a request
        # leaving clears the flag; the slots a compaction freed are room too
        running_batch.batch_is_full = False
        backend.ACTIVE.room_made = False


def _around_free_kv_row(original, cache, kv, ranges):
    from kvrag.engine_plugin import backend
    from kvrag.engine_plugin.compaction import release_ranges

    resident = backend.ACTIVE.release(kv.req_pool_idx) if backend.ACTIVE else None
    if resident is None:
        return original(cache, kv, ranges)
    compacted = resident.record
    rest = release_ranges(compacted, ranges)
    if rest:
        original(cache, kv, rest)
    if resident.once is not None and cache.supports_prefix_sharing():
        _store_once(cache, resident.once, compacted.slots)
    else:
        cache.token_to_kv_pool_allocator.free(compacted.slots)
    return None


def _store_once(cache, once, slots) -> None:
    """Give a built compressed corpus prefix to the tree, under its key (once.py)."""
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(once.key, namespace_of(once), cache_salt=once.cache_salt)
    result = cache.insert(InsertParams(key=key, value=slots.to(torch.int64)))
    if result.prefix_len:  # another request stored the same prefix first
        cache.token_to_kv_pool_allocator.free(slots[:result.prefix_len])
    logger.info("kvrag: stored the %s corpus prefix (%d slots for %d tokens)%s",
                once.spec.name, once.kmax, once.end,
                "; it was there already" if result.prefix_len else "")


def _after_private_tokens(result, kv, *args, **kwargs):
    from kvrag.engine_plugin import backend

    resident = backend.ACTIVE.resident.get(kv.req_pool_idx) if backend.ACTIVE else None
    if resident is None:
        return result
    comp = resident.record
    return result - (comp.n - comp.protected) + int(comp.slots.numel())


def _before_decode_result(scheduler, batch, *args, **kwargs):
    """With ``KVRAG_PLUGIN_POOL_LOG``: the pool's slots in use while ``batch`` decodes (the
    tree's cached prefixes included) and how many requests it holds."""
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        return
    allocator = scheduler.token_to_kv_pool_allocator
    line = {"used": int(allocator.size - allocator.available_size()),
            "running": len(batch.reqs)}
    with open(os.environ[config.ENV_POOL_LOG], "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _stats_line(active, rid, wanted, done, free_before: int, free_after: int) -> dict:
    comp = done.compacted
    logger.info("kvrag: %s kept %d slots for %d tokens (%s), freed %d slots", rid,
                comp.kv_tokens, comp.n, wanted.spec.name, done.freed)
    line = {
        "rid": rid, "spec": wanted.spec.name, "span": list(wanted.span),
        "prompt_tokens": comp.n, "protected": comp.protected, "keep": comp.keep,
        **_held(active, comp.kv_tokens, comp.layer_mean_tokens),
        "freed": done.freed, "allocated": done.allocated,
        "free_before": free_before, "free_after": free_after, "seconds": done.seconds,
    }
    if os.environ.get(config.ENV_RECORD_KEPT) == "1":
        line["kept"] = [k.tolist() for k in comp.kept]
    return line


def _write_stats(line: dict) -> None:
    """One line per compressed request in ``KVRAG_PLUGIN_STATS``, if set (by TP rank 0:
    every rank compresses its own heads of the same request alike)."""
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

    path = os.environ.get(config.ENV_STATS)
    if not path or get_tensor_model_parallel_rank() != 0:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
