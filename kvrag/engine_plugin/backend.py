"""``--attention-backend kvrag``: an inner SGLang backend plus KV-cache compression.

The inner backend (``KVRAG_INNER_BACKEND``: torch_native on a CPU, triton on a GPU by
default) does every prefill and every decode batch without a compressed request. On top:

- prefill (``forward_extend``) also keeps, per request and layer, the last queries of the
  prompt, which the scoring methods read (SnapKV's observation window);
- after a request's last prefill chunk, the scheduler hook in ``register.py`` calls
  ``compress`` (see ``compaction.py``), which shrinks its cache and frees slots;
- a decode batch holding a compressed request runs here: each request attends to its
  compacted slots (per layer, only its kept count) plus its decoded tokens. Over
  torch_native every decode runs here: reading a request's keys as views of its runs of
  consecutive slots, instead of gathering them as torch_native does, is several times
  faster on a CPU, and a compressed request's slots stay in runs (it reuses its own).

Shapes follow SGLang: q [tokens, q_heads * head_dim], pool buffers [slot, kv_head, dim].
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from kvrag.compression import CompressionSpec
from kvrag.engine_plugin.compaction import Compacted, CompactionResult, compact

logger = logging.getLogger(__name__)

# The backend of this process: the scheduler hooks run in the process that owns it.
ACTIVE: KvragAttnBackend | None = None


MAX_RUNS = 16  # slot runs read as views; a more fragmented request is gathered instead


def _runs(slots: torch.Tensor) -> list[tuple[int, int]] | None:
    """(first slot, length) of each run of consecutive slots; None past MAX_RUNS."""
    if slots.numel() == 0:
        return []
    breaks = (torch.nonzero(slots[1:] - slots[:-1] != 1).flatten() + 1).tolist()
    if len(breaks) >= MAX_RUNS:
        return None
    bounds = [0, *breaks, slots.numel()]
    return [(int(slots[a]), b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _truncate(runs: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    out = []
    for start, length in runs:
        if count <= 0:
            break
        out.append((start, min(length, count)))
        count -= length
    return out


@dataclass
class _DecodePlan:
    """Where one request's keys are this decode step: its prompt part (compacted or not),
    then its decoded tokens, each as slot runs when they are few, else as slot lists."""

    prompt: torch.Tensor
    decoded: torch.Tensor
    prompt_runs: list[tuple[int, int]] | None
    decoded_runs: list[tuple[int, int]] | None
    keep: list[int] | None  # per layer, for a compacted request

    @classmethod
    def of(cls, row: torch.Tensor, seq_len: int, comp: Compacted | None) -> _DecodePlan:
        if comp is None:
            prompt, decoded, keep = row[:seq_len], row[:0], None
        else:
            prompt, decoded, keep = comp.slots, row[comp.n:seq_len], comp.keep
        return cls(prompt, decoded, _runs(prompt), _runs(decoded), keep)

    def pieces(self, layer: int) -> list[slice | torch.Tensor]:
        count = self.prompt.numel() if self.keep is None else self.keep[layer]
        if self.prompt_runs is not None and self.decoded_runs is not None:
            return [slice(s, s + n) for s, n in
                    _truncate(self.prompt_runs, count) + self.decoded_runs]
        return [torch.cat([self.prompt[:count], self.decoded])]


def _attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
            scale: float) -> torch.Tensor:
    """One decoded token's attention over key/value pieces, GQA without copying them.

    q: [q_heads, d]; keys/values: [len_i, kv_heads, d] each. Returns [q_heads, d].
    """
    kv_heads, d = keys[0].shape[1], q.shape[-1]
    qg = q.view(kv_heads, -1, d)  # [kv_heads, group, d]
    scores = torch.cat([torch.matmul(qg, k.to(q.dtype).permute(1, 2, 0)) for k in keys], -1)
    weights = (scores * scale).softmax(-1)  # [kv_heads, group, total]
    out = torch.zeros_like(qg)
    start = 0
    for v in values:
        out += torch.matmul(weights[..., start:start + v.shape[0]], v.to(q.dtype).transpose(0, 1))
        start += v.shape[0]
    return out.reshape(q.shape[0], -1)


class _QueryTail:
    """The last ``keep`` queries of one request's prompt, per layer, across chunks."""

    def __init__(self) -> None:
        self.end = 0  # prompt position after the last captured query
        self.layers: dict[int, torch.Tensor] = {}  # layer_id -> [m, q_heads, d]


class KvragAttnBackend(AttentionBackend):
    def __init__(self, model_runner, inner, capture: int | None) -> None:
        """``capture``: prompt queries kept per request and layer (None: all, for h2o)."""
        super().__init__()
        self.inner = inner
        self.capture = capture
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.pool = model_runner.token_to_kv_pool
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.layer_ids = list(range(self.pool.start_layer,
                                    self.pool.start_layer + self.pool.layer_num))
        self.tails: dict[int, _QueryTail] = {}  # req_pool_idx -> captured queries
        self.compacted: dict[int, Compacted] = {}  # req_pool_idx -> compressed cache
        # decode on a CPU runs here for every batch (faster than torch_native's gather);
        # elsewhere only batches holding a compressed request do
        self.decode_all = isinstance(inner, TorchNativeAttnBackend)
        self._plan: list[_DecodePlan] | None = None
        self._plan_compacted = False

    # --- delegation: the inner backend owns metadata and CUDA-graph state ---
    def init_forward_metadata(self, forward_batch) -> None:
        self._plan = None
        if forward_batch.forward_mode.is_decode():
            rows = forward_batch.req_pool_indices.tolist()
            found = [self.compacted.get(r) for r in rows]
            if self.decode_all or any(c is not None for c in found):
                self._plan = [
                    _DecodePlan.of(self.req_to_token[row], seq_len, comp) for row, seq_len, comp
                    in zip(rows, forward_batch.seq_lens.tolist(), found, strict=True)]
                self._plan_compacted = any(c is not None for c in found)
        self.inner.init_forward_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        return self.inner.init_cuda_graph_state(max_bs, max_num_tokens)

    def init_forward_metadata_capture_cuda_graph(self, *args, **kwargs):
        return self.inner.init_forward_metadata_capture_cuda_graph(*args, **kwargs)

    def init_forward_metadata_replay_cuda_graph(self, *args, **kwargs):
        return self.inner.init_forward_metadata_replay_cuda_graph(*args, **kwargs)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    def support_triton(self):
        return self.inner.support_triton()

    # --- prefill: capture the prompt's last queries ---
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._capture(q, layer, forward_batch)
        return self.inner.forward_extend(q, k, v, layer, forward_batch,
                                         save_kv_cache=save_kv_cache, **kwargs)

    def _capture(self, q: torch.Tensor, layer, forward_batch) -> None:
        if layer.is_cross_attention or forward_batch.extend_prefix_lens_cpu is None:
            return
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        rows = forward_batch.req_pool_indices.tolist()
        prefix = forward_batch.extend_prefix_lens_cpu
        lengths = forward_batch.extend_seq_lens_cpu
        start = 0
        for row, pre, length in zip(rows, prefix, lengths, strict=True):
            tail = self.tails.get(row)
            if tail is None or (layer.layer_id == self.layer_ids[0] and tail.end != pre):
                # a new request in this row (or a row left by an aborted one)
                tail = self.tails[row] = _QueryTail()
            chunk = q[start:start + length]
            old = tail.layers.get(layer.layer_id)
            both = chunk if old is None else torch.cat([old, chunk])
            keep = both if self.capture is None else both[-self.capture:]
            tail.layers[layer.layer_id] = keep.detach().clone()
            if layer.layer_id == self.layer_ids[-1]:
                tail.end = pre + length
            start += length

    # --- decode ---
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        windowed = layer.is_cross_attention or (layer.sliding_window_size or -1) > -1
        if windowed and self._plan is not None and self._plan_compacted:
            raise NotImplementedError("kvrag compression serves full-attention layers only")
        if self._plan is None or windowed:
            return self.inner.forward_decode(q, k, v, layer, forward_batch,
                                             save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = q.new_empty((q.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        kbuf = self.pool.get_key_buffer(layer.layer_id)
        vbuf = self.pool.get_value_buffer(layer.layer_id)
        local = layer.layer_id - self.layer_ids[0]
        for i, plan in enumerate(self._plan):
            pieces = plan.pieces(local)
            keys = [kbuf[p] for p in pieces]  # [len, kv_heads, d]: views for slot runs
            values = [vbuf[p] for p in pieces]
            out[i] = _attend(q[i], keys, values, layer.scaling)
        return out.view(q.shape[0], -1)

    # --- called by the scheduler hook after a request's last prefill chunk ---
    def compress(self, row: int, *, rid: str, protected: int, spec: CompressionSpec,
                 span: tuple[int, int], make_room: Callable[[int], object] | None = None,
                 ) -> CompactionResult | None:
        """Compress the prompt KV of the request in ``row``; None leaves it uncompressed."""
        tail = self.tails.pop(row, None)
        if tail is None or len(tail.layers) != len(self.layer_ids) or tail.end < span[1]:
            logger.warning("kvrag: no prefill queries for request %s; left uncompressed", rid)
            return None
        n = tail.end
        needed = spec.build().queries_needed()
        have = tail.layers[self.layer_ids[0]].shape[0]
        if needed is None and have < n - protected or needed is not None and have < min(
                needed, n - protected):
            logger.warning("kvrag: %s needs %s prompt queries, the backend kept %d; request "
                           "%s left uncompressed", spec.name, needed or "all", have, rid)
            return None
        result = compact(
            self.pool, self.allocator, self.req_to_token[row], rid=rid, n=n,
            protected=protected, layer_ids=self.layer_ids,
            queries=[tail.layers[lid] for lid in self.layer_ids], spec=spec, span=span,
            make_room=make_room,
        )
        if result is None:
            logger.warning("kvrag: no free slots for the compacted cache of request %s (its "
                           "prefix is shared); left uncompressed", rid)
        if result is not None:
            self.compacted[row] = result.compacted
        return result

    def release(self, row: int) -> Compacted | None:
        """Forget a request leaving ``row``; its compacted record, if it had one."""
        self.tails.pop(row, None)
        return self.compacted.pop(row, None)
