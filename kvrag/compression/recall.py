"""Per-question recall over a corpus compressed once (``once:...+recall``): the one
definition both engines serve.

- **Host store.** When a ``+recall`` corpus is compressed, it keeps one set per layer for
  all its KV heads (``heads=shared``); the keys (after RoPE, so they keep their positions)
  and values of every layer's evicted document tokens go to a ``HostStore`` in host
  memory, which lives and dies with the compressed corpus.
- **Scoring.** A question is first prefilled over the kept corpus. Its last ``WINDOW``
  queries (the question and the chat-template tail) each attend, in float32, over every
  key of the logical prompt: the kept corpus, the evicted tokens, and the question's own
  keys up to its position. An evicted token's score is its attention weight averaged
  over those queries and over every query head of the layer (all tensor-parallel ranks').
- **Choice.** Per layer, evicted tokens are grouped by the document chunk they lie in
  (``chunk`` tokens from the documents' start); chunks are ranked by the mean score of
  their evicted tokens and taken whole, best first, until the budget is met, the last one
  by its best tokens (``select.chunk_priority``'s rule).
- **Answer.** The recalled entries are copied into device memory the question owns. With
  ``reprefill=1`` (the default) the question is prefilled again over the kept corpus and
  the recalled entries, and its first prefill is dropped; with ``reprefill=0`` it keeps
  its first prefill (and the first answer token sampled from it) and decodes over kept,
  recalled and its own entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrag.compression.base import WHOLE, HeadShard
from kvrag.compression.select import chunk_priority
from kvrag.compression.spec import CompressionSpec

#: the question's last queries that score the evicted tokens (SnapKV's window)
WINDOW = 64
_BLOCK = 8192  # keys per attention block, so no [heads, queries, corpus] tensor is built


@dataclass
class HostStore:
    """A compressed corpus's evicted entries, every layer, in host memory.

    ``positions``: [layers, n_evicted] ascending prompt positions (CPU);
    ``keys``/``values``: per layer, [n_evicted, kv_heads, head_dim] (SGLang's pool
    layout), pinned where CUDA runs so copies back are asynchronous.
    """

    positions: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def of(cls, keys: list[torch.Tensor], values: list[torch.Tensor],
           kept: list[torch.Tensor], n: int) -> HostStore:
        """keys/values[layer]: [kv_heads, >= n, d] a layer's prompt KV on the device;
        kept[layer]: [kv_heads, k] kept positions, the same in every row (shared heads)."""
        pin = torch.cuda.is_available()
        positions, host_k, host_v = [], [], []
        for k, v, idx in zip(keys, values, kept, strict=True):
            evicted = torch.ones(n, dtype=torch.bool, device=idx.device)
            evicted[idx[0]] = False
            where = torch.nonzero(evicted).flatten()
            positions.append(where.cpu())
            for src, out in ((k, host_k), (v, host_v)):
                entries = src[:, where.to(src.device)].transpose(0, 1).contiguous().cpu()
                out.append(entries.pin_memory() if pin else entries)
        return cls(torch.stack(positions), host_k, host_v)

    @property
    def n_evicted(self) -> int:
        return self.positions.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the store holds, read off its tensors."""
        return sum(t.untyped_storage().nbytes() for t in (*self.keys, *self.values,
                                                          self.positions))

    def fetch(self, layer: int, idx: torch.Tensor, device, dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s entries ``idx`` (indices into the store), [R, kv_heads, d],
        on ``device`` in ``dtype``."""
        idx = idx.cpu()
        return tuple(t[layer][idx].to(device, dtype, non_blocking=True)
                     for t in (self.keys, self.values))


def _logits(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[q_heads, m, n] scaled dot products; keys [kv_heads, n, d] shared by GQA groups."""
    group = queries.shape[0] // keys.shape[0]
    k = keys.float().repeat_interleave(group, dim=0)
    return queries @ k.transpose(1, 2) / keys.shape[-1] ** 0.5


def _blocks(keys: torch.Tensor):
    for start in range(0, keys.shape[1], _BLOCK):
        yield keys[:, start:start + _BLOCK]


def recall_scores(queries: torch.Tensor, kept_keys: torch.Tensor, evicted_keys: torch.Tensor,
                  own_keys: torch.Tensor, shard: HeadShard = WHOLE) -> torch.Tensor:
    """[n_evicted] scores of one layer's evicted tokens (see the module docstring).

    queries: [q_heads, m, d], the question's last m queries, query j at own position
    ``q - m + j``; kept_keys: [kv_heads, k, d]; evicted_keys: [kv_heads, n_evicted, d];
    own_keys: [kv_heads, q, d], the question's keys.
    """
    queries = queries.float()
    m, q = queries.shape[1], own_keys.shape[1]
    own = _logits(queries, own_keys)
    future = torch.arange(q, device=own.device) > torch.arange(q - m, q, device=own.device)[:, None]
    parts = [own.masked_fill(future, float("-inf")).logsumexp(-1)]
    for keys in (kept_keys, evicted_keys):
        parts += [_logits(queries, block).logsumexp(-1) for block in _blocks(keys)]
    lse = torch.stack(parts).logsumexp(0)[..., None]  # [q_heads, m, 1]
    weights = torch.cat([(_logits(queries, block) - lse).exp().mean(dim=1)
                         for block in _blocks(evicted_keys)], dim=-1)  # [q_heads, n_evicted]
    return shard.all_query_heads(weights).mean(dim=0)


def choose(scores: torch.Tensor, positions: torch.Tensor, span: tuple[int, int], chunk: int,
           budget: int) -> torch.Tensor:
    """Ascending indices (into ``positions``) of the ``budget`` evicted tokens recalled:
    whole chunks by mean score, ties to the earlier chunk."""
    n = scores.shape[0]
    if budget <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    chunk_of = (positions.to(scores.device) - span[0]) // chunk
    starts = torch.nonzero(torch.cat([chunk_of.new_ones(1), chunk_of[1:] != chunk_of[:-1]]))
    priority = chunk_priority(scores[None].double(), (0, n), starts.flatten())
    best = torch.sort(priority[0], descending=True, stable=True).indices[:budget]
    return torch.sort(best).values


def recall_indices(spec: CompressionSpec, queries: list[torch.Tensor],
                   kept_keys: list[torch.Tensor], own_keys: list[torch.Tensor],
                   store: HostStore, span: tuple[int, int], shard: HeadShard = WHOLE,
                   ) -> list[torch.Tensor]:
    """Per layer, the store indices a question recalls (ascending), by ``spec.recall``.

    queries[layer]: [q_heads, >= 1, d] the question's last queries (the last ``WINDOW``
    are used); kept_keys[layer]: [kv_heads, k, d]; own_keys[layer]: [kv_heads, q, d].
    """
    assert spec.recall is not None
    n_doc = span[1] - span[0]
    budget = spec.recall.budget(n_doc, store.n_evicted)
    out = []
    with torch.no_grad():
        for layer, (qs, kept, own) in enumerate(zip(queries, kept_keys, own_keys, strict=True)):
            evicted = store.keys[layer].to(kept.device, non_blocking=True).transpose(0, 1)
            scores = recall_scores(qs[:, -WINDOW:], kept, evicted, own, shard)
            out.append(choose(scores, store.positions[layer], span, spec.recall.chunk, budget))
    return out


def recalled_positions(store: HostStore, indices: list[torch.Tensor]) -> list[list[int]]:
    """Per layer, the prompt positions ``indices`` recall (for reports and tests)."""
    return [store.positions[layer][idx.cpu()].tolist() for layer, idx in enumerate(indices)]
