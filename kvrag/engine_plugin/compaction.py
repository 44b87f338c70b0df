"""Compressing one request's KV in SGLang's pool.

SGLang's KV buffer is ``[slot, kv_head, head_dim]`` per layer, and ``req_to_token[row]``
maps a request's token positions to slots. After the last prefill chunk, the kept tokens
of every (layer, KV head) are copied into ``kmax`` slots (slot j holds the j-th kept token
of *each* head, which may be a different token per head), and the request's other own
slots go back to the allocator. Under ``heads=ranked`` the heads keep different counts
with the same total per layer, and their tokens are packed into the slots' cells instead
(``cells.py``). Which slots a request may reuse or free, and what happens to them
afterwards, is ``rows.py``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvrag.compression import CompressionSpec, kept_positions
from kvrag.compression.base import WHOLE, HeadShard
from kvrag.compression.recall import HostStore
from kvrag.compression.select import PAD, kept_counts
from kvrag.engine_plugin.cells import CellLayout, cell_targets


@dataclass
class Compacted:
    """One compressed request's cache. ``keep[layer]`` of ``slots`` are valid per layer."""

    rid: str
    n: int  # prompt tokens whose KV was computed at prefill
    protected: int  # leading positions owned by the radix tree
    slots: torch.Tensor  # [kmax] pool slots holding the kept tokens
    keep: list[int]  # per layer: tokens kept (documents kept plus everything outside span)
    kept: list[torch.Tensor] = field(repr=False)  # per layer: [kv_heads, keep] positions
    layout: CellLayout | None = None  # heads=ranked: the per-head counts in the cells
    host: HostStore | None = None  # +recall: the evicted entries, copied to host memory

    @property
    def kv_tokens(self) -> int:
        """Pool slots the prompt holds: one per kept position of its largest layer."""
        return int(self.slots.numel())

    @property
    def layer_mean_tokens(self) -> float:
        """Kept tokens per layer, averaged (below ``kv_tokens`` under per-layer budgets)."""
        return sum(self.keep) / len(self.keep)


@dataclass(frozen=True)
class CompactionResult:
    compacted: Compacted
    freed: int  # slots returned to the allocator
    allocated: int  # extra slots taken (only when own slots were fewer than kmax)
    seconds: float


def compact(
    pool, allocator, row: torch.Tensor, *, rid: str, n: int, protected: int,
    layer_ids: list[int], queries: list[torch.Tensor], spec: CompressionSpec,
    span: tuple[int, int], make_room: Callable[[int], object] | None = None,
    shard: HeadShard = WHOLE, sentence_ends: torch.Tensor | None = None,
    reconstruction: list[torch.Tensor] | None = None,
) -> CompactionResult | None:
    """Compress positions ``[0, n)`` of ``row`` in ``pool``; None if no slots to spare.

    pool: SGLang KV pool (``get_key_buffer(layer_id)`` -> [slots, kv_heads, d]);
    queries[i]: [m, q_heads, d] captured at prefill for ``layer_ids[i]``;
    make_room(k): evict unlocked radix-cache entries until k slots can be allocated;
    shard: this rank's KV heads under tensor parallelism;
    sentence_ends: bool [>= n], the tokens that end a sentence, for ``chunk=sentence``;
    reconstruction: per layer, KVzip's pass scores [kv_heads, n].
    """
    t0 = time.perf_counter()
    ctx = row[:n].clone()
    keys = [pool.get_key_buffer(lid)[ctx].transpose(0, 1) for lid in layer_ids]
    kept = kept_positions(spec, keys, [q.transpose(0, 1) for q in queries], span, shard,
                          reconstruction=reconstruction, sentence_ends=sentence_ends)
    host = None
    if spec.recall is not None:  # before the kept entries overwrite the request's slots
        host = HostStore.of(keys, [pool.get_value_buffer(lid)[ctx].transpose(0, 1)
                                   for lid in layer_ids], kept, n)
    counts = torch.stack([kept_counts(k) for k in kept])  # [layers, kv_heads]
    keep = (counts.sum(dim=1) // counts.shape[1]).tolist()
    kmax = max(keep)
    own = row[protected:n].clone()
    allocated = 0
    if kmax <= own.numel():
        slots, to_free = own[:kmax], own[kmax:]
    else:
        extra = allocator.alloc(kmax - own.numel())
        if extra is None and make_room is not None:
            make_room(kmax - own.numel())
            extra = allocator.alloc(kmax - own.numel())
        if extra is None:
            return None
        allocated = kmax - own.numel()
        slots, to_free = torch.cat([own, extra.to(own.dtype)]), own[:0]
    ranked = spec.ranked_heads
    for lid, idx, k_layer, count in zip(layer_ids, kept, keys, counts, strict=True):
        kbuf, vbuf = pool.get_key_buffer(lid), pool.get_value_buffer(lid)
        if ranked:
            _pack_cells(kbuf, vbuf, k_layer, ctx, idx, cell_targets(count, slots))
            continue
        kv_heads, width = idx.shape
        heads = torch.arange(kv_heads, device=idx.device)[:, None]
        src = ctx[idx.to(ctx.device)]  # [kv_heads, width] slots of the kept tokens
        new_k = k_layer[heads, idx].transpose(0, 1)  # [width, kv_heads, d]
        new_v = vbuf[src, heads].transpose(0, 1)
        kbuf[slots[:width]] = new_k.to(kbuf.dtype)
        vbuf[slots[:width]] = new_v.to(vbuf.dtype)
    if to_free.numel():
        allocator.free(to_free)
    layout = CellLayout(counts.cpu(), kmax) if ranked else None
    record = Compacted(rid, n, protected, slots, keep, kept, layout, host)
    return CompactionResult(record, int(to_free.numel()), allocated, time.perf_counter() - t0)


def _pack_cells(kbuf: torch.Tensor, vbuf: torch.Tensor, keys: torch.Tensor,
                ctx: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor) -> None:
    """Copy one layer's kept entries (``idx`` [kv_heads, width], rows ending in PAD) into
    the flat cells ``targets``, head by head; every source is read before any is written."""
    heads, at = torch.nonzero(idx != PAD, as_tuple=True)  # head-major, as targets are
    pos = idx[heads, at]
    new_k = keys[heads, pos]  # [entries, d]
    new_v = vbuf[ctx[pos.to(ctx.device)], heads.to(ctx.device)]
    kbuf.view(-1, kbuf.shape[-1])[targets] = new_k.to(kbuf.dtype)
    vbuf.view(-1, vbuf.shape[-1])[targets] = new_v.to(vbuf.dtype)
