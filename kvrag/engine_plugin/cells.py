"""Per-head budgets in SGLang's pool: kept tokens packed into cells, attention over cells.

A layer's KV buffer is ``[slot, kv_head, head_dim]``; seen flat it is ``slot x kv_head``
*cells* of one head vector each. With ``heads=ranked`` a layer keeps the same total
``K x kv_heads`` entries but each head its own count, so a compacted prompt holds exactly
``K`` slots: head ``h``'s kept tokens fill the next ``count[h]`` cells in head order,
cell ``j`` being column ``j % kv_heads`` of the prompt's ``j // kv_heads``-th slot. A
head may so use cells of other heads' columns; the inner backend, which reads column
``h`` for head ``h``, cannot read that, so requests over such a prompt attend here.

The layout of a packed prompt is its per-(layer, head) counts alone (``CellLayout``):
with the slots it occupies, in order, that gives every head's cell list. A compress-once
prefix keeps its counts beside its tree entry (``PluginState.stored_layouts``).

Attention here is one formulation for every request of a batch: each (request, head)
reads a list of flat cell indices (its kept cells, then one cell per later token in its
own column), padded to the batch's longest and masked, gathered and attended with batched
tensor ops, so requests and heads run together on an accelerator as on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cell_targets(counts: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[sum(counts)] flat cell indices where a layer's kept entries go, head by head.

    counts: [kv_heads] entries per head; slots: [K] the prompt's slots, K * kv_heads ==
    sum(counts).
    """
    kv_heads = counts.shape[0]
    j = torch.arange(int(counts.sum()), device=slots.device)
    return slots[j // kv_heads].to(torch.int64) * kv_heads + j % kv_heads


@dataclass(frozen=True)
class CellLayout:
    """Where a packed prompt's heads are: ``counts`` [layers, kv_heads] (local layers,
    this rank's heads) over the first ``kmax`` positions of the row that reads it."""

    counts: torch.Tensor
    kmax: int

    def cells(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat cell indices, valid) [layers, kv_heads, width] for the prompt in
        ``slots`` [kmax], each head's list padded to the widest."""
        layers, kv_heads = self.counts.shape
        counts = self.counts.to(slots.device)
        width = int(counts.max()) if counts.numel() else 0
        start = torch.cumsum(counts, dim=1) - counts  # [layers, kv_heads]
        at = torch.arange(width, device=slots.device)
        valid = at < counts[..., None]
        j = torch.where(valid, start[..., None] + at, torch.zeros_like(at))
        return slots.to(torch.int64)[j // kv_heads] * kv_heads + j % kv_heads, valid


@dataclass
class CellRead:
    """One request's keys for a forward, as flat cell indices per (layer, head):
    ``index``/``valid`` [layers, kv_heads, S], the packed prompt's cells then the
    ``tokens`` later tokens' cells (one per token, in the head's own column)."""

    index: torch.Tensor
    valid: torch.Tensor
    tokens: int

    @classmethod
    def of(cls, row: torch.Tensor, length: int, layout: CellLayout | None,
           layers: int, kv_heads: int) -> CellRead:
        """``row``: the req_to_token row the request is read from, valid up to ``length``."""
        kmax = 0 if layout is None else layout.kmax
        heads = torch.arange(kv_heads, device=row.device)
        linear = row[kmax:length].to(torch.int64)[None] * kv_heads + heads[:, None]
        linear = linear.expand(layers, -1, -1)
        if layout is None:
            return cls(linear, torch.ones_like(linear, dtype=torch.bool), length)
        cells, valid = layout.cells(row[:kmax])
        return cls(torch.cat([cells, linear], dim=2),
                   torch.cat([valid, torch.ones_like(linear, dtype=torch.bool)], dim=2),
                   length - kmax)


def stack(reads: list[CellRead]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reads of a batch padded to one length: [layers, batch, kv_heads, S] each."""
    width = max(r.index.shape[2] for r in reads)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[2]), value=value)

    return (torch.stack([pad(r.index, 0) for r in reads], dim=1),
            torch.stack([pad(r.valid, False) for r in reads], dim=1))


def attend(q: torch.Tensor, index: torch.Tensor, allowed: torch.Tensor, kbuf: torch.Tensor,
           vbuf: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``q`` [batch, m, q_heads, d] over cell lists.

    index: [batch, kv_heads, S] flat cells of ``kbuf``/``vbuf`` ([slots, kv_heads, d]);
    allowed: bool [batch, m, kv_heads, S], which of them each query sees.
    Returns [batch, m, q_heads, d_v] in ``q``'s dtype; scores, softmax and the weighted
    sum run in float32, as attention kernels accumulate.
    """
    batch, m, q_heads, d = q.shape
    kv_heads = index.shape[1]
    keys = kbuf.view(-1, kbuf.shape[-1])[index].float()  # [b, h, S, d]
    values = vbuf.view(-1, vbuf.shape[-1])[index].float()
    qg = q.float().view(batch, m, kv_heads, q_heads // kv_heads, d).permute(0, 2, 3, 1, 4)
    logits = torch.einsum("bhgmd,bhsd->bhgms", qg, keys) * scale
    mask = allowed.permute(0, 2, 1, 3)[:, :, None]  # [b, h, 1, m, S]
    weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhgms,bhsd->bhgmd", weights, values)  # [b, h, g, m, d_v]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, m, q_heads, -1).to(q.dtype)
