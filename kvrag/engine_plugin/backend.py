"""``--attention-backend kvrag``: an inner SGLang backend plus KV-cache compression.

The inner backend (``KVRAG_INNER_BACKEND``: torch_native on a CPU, triton on a GPU by
default) does every prefill and every decode batch without a compressed request. On top:

- prefill (``forward_extend``) also keeps, per request and layer, the last queries of the
  prompt, which the scoring methods read (SnapKV's observation window);
- after a request's last prefill chunk, the scheduler hook in ``register.py`` calls
  ``compress`` (see ``compaction.py``), which shrinks its cache and frees slots;
- a decode batch holding a compressed request runs here: each request attends to its
  compacted slots (per layer, only its kept count) plus its decoded tokens.

Shapes follow SGLang: q [tokens, q_heads * head_dim], pool buffers [slot, kv_head, dim].
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from kvrag.compression import CompressionSpec
from kvrag.engine_plugin.compaction import Compacted, CompactionResult, compact

logger = logging.getLogger(__name__)

# The backend of this process: the scheduler hooks run in the process that owns it.
ACTIVE: KvragAttnBackend | None = None


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
        self._batch_compacted: list[Compacted | None] | None = None
        self._batch_rows: list[int] = []
        self._batch_lens: list[int] = []

    # --- delegation: the inner backend owns metadata and CUDA-graph state ---
    def init_forward_metadata(self, forward_batch) -> None:
        self._batch_compacted = None
        if forward_batch.forward_mode.is_decode() and self.compacted:
            rows = forward_batch.req_pool_indices.tolist()
            found = [self.compacted.get(r) for r in rows]
            if any(c is not None for c in found):
                self._batch_compacted = found
                self._batch_rows = rows
                self._batch_lens = forward_batch.seq_lens.tolist()
                return  # this decode runs in forward_decode below, not in the inner backend
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
        if layer.is_cross_attention:
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
        if self._batch_compacted is None:
            return self.inner.forward_decode(q, k, v, layer, forward_batch,
                                             save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = q.new_empty((q.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        kbuf = self.pool.get_key_buffer(layer.layer_id)
        vbuf = self.pool.get_value_buffer(layer.layer_id)
        local = layer.layer_id - self.layer_ids[0]
        for i, (row, seq_len, comp) in enumerate(
                zip(self._batch_rows, self._batch_lens, self._batch_compacted, strict=True)):
            tokens = self.req_to_token[row]
            if comp is None:
                slots = tokens[:seq_len]
            else:
                slots = torch.cat([comp.slots[:comp.keep[local]], tokens[comp.n:seq_len]])
            keys = kbuf[slots].transpose(0, 1).to(q.dtype)  # [kv_heads, len, d]
            values = vbuf[slots].transpose(0, 1).to(q.dtype)
            out[i] = scaled_dot_product_attention(
                q[i][:, None, :], keys, values, scale=layer.scaling,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
            )[:, 0, :]
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
