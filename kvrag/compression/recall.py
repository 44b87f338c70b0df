"""Per-question recall over a corpus compressed once (``once:...+recall``): the one
definition both engines serve.

- **Host store.** When a ``+recall`` corpus is compressed, it keeps one set per layer for
  all its KV heads (``heads=shared``); the keys (after RoPE, so they keep their positions)
  and values of every layer's evicted document tokens go to a ``HostStore`` in host
  memory, which lives and dies with the compressed corpus.
- **Scoring.** A question is first prefilled over the kept corpus. Its last ``window``
  (default 64) queries (the question and the chat-template tail) each attend, in float32, over every
  key of the logical prompt: the kept corpus, the evicted tokens, and the question's own
  keys up to its position. An evicted token's score in a layer is the largest weight any
  of those queries gives it, averaged over every query head of the layer (all
  tensor-parallel ranks'): a span one query looks at hard counts, where averaging over
  queries would drown it in the weight every query spreads over the whole prompt.
- **Choice.** Evicted tokens are grouped by the document chunk they lie in (``chunk``
  tokens from the documents' start). Each layer scores a chunk by the mean score of its
  evicted tokens there, scaled so the layer's chunk scores sum to 1; chunks are ranked
  once, for all layers, by the sum of their layers' scores (ties to the earlier chunk),
  because an answer needs its span in most layers, not only in the layers that find it.
  With ``after=A`` the A chunks that follow each ranked chunk come right after it (unless
  they rank higher on their own): a question's queries find the key they name, and the
  answer is often the text that follows it.
  Each layer then takes its evicted tokens of the best chunks, best first, until its
  budget is met, the last chunk by its best tokens; every layer recalls the same count.
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
from kvrag.compression.spec import CompressionSpec

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
    weights = torch.cat([(_logits(queries, block) - lse).exp().amax(dim=1)
                         for block in _blocks(evicted_keys)], dim=-1)  # [q_heads, n_evicted]
    return shard.all_query_heads(weights).mean(dim=0)


def chunk_scores(scores: list[torch.Tensor], positions: torch.Tensor, span: tuple[int, int],
                 chunk: int) -> torch.Tensor:
    """[n_chunks] float64: each document chunk's mean evicted score per layer, scaled to
    sum 1 in each layer, summed over layers (the ranking ``choose`` follows)."""
    n_chunks = -(-(span[1] - span[0]) // chunk)
    device = scores[0].device
    pooled = torch.zeros(n_chunks, dtype=torch.float64, device=device)
    for layer_scores, row in zip(scores, positions, strict=True):
        chunks = (row.to(device) - span[0]) // chunk
        sums = torch.zeros(n_chunks, dtype=torch.float64, device=device)
        sums.index_add_(0, chunks, layer_scores.double())
        counts = torch.bincount(chunks, minlength=n_chunks)
        means = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        if float(means.sum()) > 0:
            pooled += means / means.sum()
    return pooled


def with_followers(rank: torch.Tensor, after: int) -> torch.Tensor:
    """Chunk sort keys where each chunk's ``after`` followers come right after it: chunk
    c's key is the smallest ``rank[c - j] * (after + 1) + j`` over j = 0..after (all
    distinct, so the order is strict)."""
    key = rank * (after + 1)
    for j in range(1, min(after, len(rank) - 1) + 1):
        key[j:] = torch.minimum(key[j:], rank[:-j] * (after + 1) + j)
    return key


def choose(scores: list[torch.Tensor], positions: torch.Tensor, span: tuple[int, int],
           chunk: int, budget: int, after: int = 0) -> list[torch.Tensor]:
    """Per layer, ascending indices (into its row of ``positions``) of the ``budget``
    evicted tokens it recalls, from every layer's ``scores`` [n_evicted] (see the module
    docstring)."""
    device = scores[0].device
    chunk_of = [(row.to(device) - span[0]) // chunk for row in positions]
    pooled = chunk_scores(scores, positions, span, chunk)
    order = torch.sort(pooled, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order,
                                            torch.arange(len(order), device=device))
    if after:
        rank = with_followers(rank, after)
    out = []
    for layer_scores, chunks in zip(scores, chunk_of, strict=True):
        by_score = torch.sort(layer_scores, descending=True, stable=True).indices
        by_chunk = torch.sort(rank[chunks[by_score]], stable=True).indices
        out.append(torch.sort(by_score[by_chunk][:max(budget, 0)]).values)
    return out


def recall_indices(spec: CompressionSpec, queries: list[torch.Tensor],
                   kept_keys: list[torch.Tensor], own_keys: list[torch.Tensor],
                   store: HostStore, span: tuple[int, int], shard: HeadShard = WHOLE,
                   ) -> list[torch.Tensor]:
    """Per layer, the store indices a question recalls (ascending), by ``spec.recall``.

    queries[layer]: [q_heads, >= 1, d] the question's last queries (the last
    ``spec.recall.window`` are used); kept_keys[layer]: [kv_heads, k, d];
    own_keys[layer]: [kv_heads, q, d].
    """
    assert spec.recall is not None
    n_doc = span[1] - span[0]
    budget = spec.recall.budget(n_doc, store.n_evicted)
    with torch.no_grad():
        scores = []
        for layer, (qs, kept, own) in enumerate(zip(queries, kept_keys, own_keys,
                                                    strict=True)):
            evicted = store.keys[layer].to(kept.device, non_blocking=True).transpose(0, 1)
            window = spec.recall.window
            scores.append(recall_scores(qs[:, -window:], kept, evicted, own, shard))
        return choose(scores, store.positions, span, spec.recall.chunk, budget,
                      spec.recall.after)


def recalled_positions(store: HostStore, indices: list[torch.Tensor]) -> list[list[int]]:
    """Per layer, the prompt positions ``indices`` recall (for reports and tests)."""
    return [store.positions[layer][idx.cpu()].tolist() for layer, idx in enumerate(indices)]
