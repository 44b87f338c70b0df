"""The plugin's entry point: SGLang calls ``register()`` in each of its processes.

Entry point group ``sglang.srt.plugins`` (pyproject.toml). ``register`` adds the
``kvrag`` attention backend and the ``kvrag-cost`` radix eviction policy to SGLang's
registries and CLI choices, and the hooks on SGLang's scheduler listed in ``HOOKS``: the
SGLang method, the kind of hook, and why. The hooks live in ``lifecycle.py`` (a
request's compression) and ``once.py`` (compress-once), named after the methods they
follow; the state they share is ``state.py``'s, created here with the backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

from kvrag.engine_plugin import config, hooks, lifecycle, once

logger = logging.getLogger(__name__)

BACKEND_NAME = "kvrag"
# inner backends that take their rows and lengths from the forward batch, so that the
# physical rows of compacted requests reach their kernels (see backend.py)
INNER_BACKENDS = ("torch_native", "triton")

_BATCH = "sglang.srt.managers.schedule_batch."
_RESULTS = "sglang.srt.managers.scheduler_components.batch_result_processor."
_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
_POLICY = "sglang.srt.managers.schedule_policy.PrefillAdder."
_RADIX = "sglang.srt.mem_cache.radix_cache.RadixCache."
_UNIFIED = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache."


@dataclass(frozen=True)
class Hook:
    target: str  # the SGLang method, dotted
    kind: str  # "before", "after" or "around"
    hook: Callable
    why: str


HOOKS = (
    Hook(_BATCH + "Req.__init__", "after", lifecycle.req_init,
         "read the request's compression once; keep a compressed one out of the radix "
         "tree; abort an invalid spec with the reason"),
    Hook(_BATCH + "Req._compute_max_prefix_len", "after", lifecycle.compute_max_prefix_len,
         "recompute the prompt queries a method scores with, even over a cached prefix"),
    Hook(_BATCH + "ScheduleBatch.prepare_for_extend", "after", lifecycle.prepare_for_extend,
         "announce which requests of the coming prefill keep their queries, the position "
         "shift of each compress-once hit, and the KVzip repeat passes it scores"),
    Hook(_RESULTS + "SchedulerBatchResultProcessor.process_batch_result_prefill", "around",
         lifecycle.process_batch_result_prefill,
         "compress requests whose prefill ended, before their results stream"),
    Hook(_STREAMER + ".stream_output", "before", lifecycle.stream_output,
         "the point between processing a prefill's results and streaming them"),
    Hook(_STREAMER + ".is_request_level_customized_info_key", "after",
         lifecycle.is_request_level_customized_info_key,
         "the plugin's report in meta_info is one value per request"),
    Hook("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", "before",
         lifecycle.get_new_batch_prefill,
         "slots a compaction freed are room to admit more requests"),
    Hook("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row", "around",
         lifecycle.free_kv_row,
         "free (or store, for compress-once) a compressed request's kept slots instead "
         "of the prompt positions they replaced"),
    Hook("sglang.srt.managers.scheduler_components.pool_stats_observer.kv_private_tokens",
         "after", lifecycle.kv_private_tokens,
         "SGLang's leak checks count a compressed request's slots as it holds them"),
    Hook(_RESULTS + "SchedulerBatchResultProcessor.process_batch_result_decode", "before",
         lifecycle.process_batch_result_decode,
         "KVRAG_PLUGIN_POOL_LOG: the slots in use at each decode step"),
    Hook("sglang.srt.managers.scheduler.Scheduler.get_internal_state", "after",
         lifecycle.get_internal_state,
         "/server_info says what the KV pool and its radix tree hold now"),
    Hook(_BATCH + "Req.init_next_round_input", "around", once.init_next_round_input,
         "a once: request matches its stored compressed corpus, or builds it"),
    Hook(_POLICY + "_select_prefill_admission", "after", once.select_prefill_admission,
         "a building once: request's chunk ends where its corpus prefix, or a KVzip "
         "repeat pass, ends; a recalling question's where its scoring pass ends"),
    Hook(_POLICY + "add_chunked_req", "before", once.add_chunked_req,
         "the same, for a request already being chunked"),
    Hook(_UNIFIED + "_evict_device_leaf", "before", lifecycle.evict_device_leaf,
         "a stored compressed prefix evicted from the tree takes its cell layout and host "
         "store with it"),
    Hook(_RADIX + "_delete_leaf", "before", lifecycle.delete_leaf,
         "the same, for the classic radix tree"),
    Hook(_UNIFIED + "reset", "after", lifecycle.reset_tree,
         "a flushed tree takes every stored prefix's layout and host store with it"),
    Hook(_RADIX + "reset", "after", lifecycle.reset_tree, "the same, for the classic tree"),
)


def register() -> None:
    """Idempotent: registries, CLI choices and hooks are added once per process."""
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    if ATTENTION_BACKENDS.get(BACKEND_NAME) is create_backend:
        return
    _supply_vllm_rotary_import()
    register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    from kvrag.engine_plugin.eviction import register_eviction_policy

    register_eviction_policy()
    hooks.install([(h.target, h.hook, h.kind) for h in HOOKS])


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
    """Factory for ``--attention-backend kvrag``; refuses settings it cannot serve, and
    creates the process's plugin state with the backend."""
    from sglang.srt.arg_groups.model_override_base import resolved_view
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from kvrag.engine_plugin.backend import KvragAttnBackend
    from kvrag.engine_plugin.capture import QueryCapture
    from kvrag.engine_plugin.reconstruction import Rebuilds
    from kvrag.engine_plugin.rows import Rows
    from kvrag.engine_plugin.state import PluginState, install

    device = str(model_runner.device)
    inner_name = os.environ.get(config.ENV_INNER_BACKEND) or (
        "torch_native" if device == "cpu" else "triton")
    if inner_name not in INNER_BACKENDS or inner_name not in ATTENTION_BACKENDS:
        raise ValueError(f"{config.ENV_INNER_BACKEND}={inner_name!r} is not an attention "
                         f"backend kvrag can wrap; choose one of {', '.join(INNER_BACKENDS)}")
    settings = config.Settings.from_env()  # an invalid variable stops the server here
    _refuse_unsupported(model_runner, device)
    python_decode = config.python_decode(inner_name)
    pool = model_runner.token_to_kv_pool
    layer_ids = list(range(pool.start_layer, pool.start_layer + pool.layer_num))
    rows = Rows(model_runner, layer_ids, _head_shard(model_runner))
    queries = QueryCapture(settings.capture, layer_ids)
    shifts = once.PositionShifts(rows.req_to_token.shape[0], rows.req_to_token.device)
    rebuilds = Rebuilds(layer_ids)
    args = resolved_view(model_runner.server_args)
    state = PluginState(
        settings, queries, rows, shifts, rebuilds, slot_bytes=_slot_bytes(pool, layer_ids),
        model_path=args.tokenizer_path or args.model_path,
        trust_remote_code=bool(args.trust_remote_code))
    inner = ATTENTION_BACKENDS[inner_name](model_runner)
    state.backend = KvragAttnBackend(model_runner, inner, queries, rows, shifts, rebuilds,
                                     python_decode=python_decode)
    install(state)
    logger.info("kvrag attention backend over %s (decode: %s); server compression: %s",
                inner_name, "python" if python_decode else "inner",
                settings.server_spec.name if settings.server_spec else "none (per request only)")
    return state.backend


def _slot_bytes(pool, layer_ids: list[int]) -> int:
    """Bytes one pool slot holds over all layers, read off the pool's buffers, on every
    tensor-parallel rank (each holds its own KV heads of every slot)."""
    per_rank = sum(int(buf[0].nbytes) for lid in layer_ids
                   for buf in (pool.get_key_buffer(lid), pool.get_value_buffer(lid)))
    return per_rank * _tp_size()


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
    missing = [h.target for h in HOOKS if h.target not in HookRegistry._patched]
    if missing:
        raise RuntimeError(f"kvrag hooks were not applied to {missing}; without them freed "
                           f"slots would leak (is sglang the pinned 0.5.23?)")
