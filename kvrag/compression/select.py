"""Choosing the kept tokens from scores: the one selection rule every engine uses.

A layer's kept positions are a tensor [kv_heads, width]. With ``heads=ranked`` the heads
keep different counts: each row is padded at its end with ``PAD`` to the layer's widest
head (``kept_counts`` reads the real counts).
"""

from __future__ import annotations

import torch

from kvrag.compression.base import WHOLE, HeadShard, Method, ScoringInput
from kvrag.compression.spec import CompressionSpec


def select_kept(scores: torch.Tensor, span: tuple[int, int], keep: int) -> torch.Tensor:
    """Indices [kv_heads, n_kept] of the tokens to keep, ascending per head.

    scores: [kv_heads, n]. Everything outside the evictable ``span`` (header, question,
    chat-template tail) is kept; inside it the ``keep`` highest-scoring tokens are.
    Ties go to the earlier token, so the choice is deterministic.
    """
    kv_heads, n = scores.shape
    start, end = span
    if not 0 <= keep <= end - start:
        raise ValueError(f"keep={keep} is outside 0..{end - start} (the evictable tokens)")
    inside = scores[:, start:end]
    # Stable descending order: a large-to-small sort that keeps the position order on ties.
    order = torch.sort(inside, dim=1, descending=True, stable=True).indices[:, :keep] + start
    outside = torch.cat([torch.arange(start), torch.arange(end, n)]).to(scores.device)
    outside = outside.expand(kv_heads, -1)
    return torch.sort(torch.cat([outside, order], dim=1), dim=1).values


PAD = -1


def kept_counts(kept: torch.Tensor) -> torch.Tensor:
    """[kv_heads] positions each head of a layer keeps (its row without ``PAD``)."""
    return (kept != PAD).sum(dim=1)


def select_ranked(scores: torch.Tensor, span: tuple[int, int], keep: int,
                  starts: torch.Tensor | None = None) -> torch.Tensor:
    """Like ``select_kept``, but the ``keep * kv_heads`` best (head, token) pairs of the
    span are chosen over all heads together; rows [kv_heads, width] end in ``PAD``.

    With chunk ``starts``, (head, chunk) pairs are ranked by their mean score instead and
    taken whole, as ``chunk_priority`` does within one head. Ties go to the lower head,
    then the earlier token.
    """
    kv_heads, n = scores.shape
    start, end = span
    n_doc = end - start
    if not 0 <= keep <= n_doc:
        raise ValueError(f"keep={keep} is outside 0..{n_doc} (the evictable tokens)")
    flat = scores[:, start:end].reshape(1, -1)
    if starts is not None and n_doc:
        rel = starts.to(scores.device) - start
        every = (rel[None] + n_doc * torch.arange(kv_heads, device=scores.device)[:, None])
        flat = chunk_priority(flat, (0, kv_heads * n_doc), every.flatten())
    chosen = torch.sort(flat[0], descending=True, stable=True).indices[:keep * kv_heads]
    taken = torch.zeros(kv_heads * n_doc, dtype=torch.bool, device=scores.device)
    taken[chosen] = True
    inside = torch.zeros(kv_heads, n, dtype=torch.bool, device=scores.device)
    inside[:, :start] = True
    inside[:, end:] = True
    inside[:, start:end] = taken.view(kv_heads, n_doc)
    counts = inside.sum(dim=1)
    width = int(counts.max())
    # each row's kept positions ascending, then PAD: sort (not kept, position)
    order = torch.sort((~inside).int() * n + torch.arange(n, device=scores.device),
                       dim=1).values[:, :width]
    return torch.where(torch.arange(width, device=scores.device) < counts[:, None],
                       order, torch.full_like(order, PAD))


def layer_budgets(method: Method, keep: int, n_layers: int, n_evictable: int) -> list[int]:
    """Per-layer kept counts, checked to average exactly ``keep``."""
    budgets = method.layer_budgets(keep, n_layers, n_evictable)
    if sum(budgets) != keep * n_layers or not all(0 <= b <= n_evictable for b in budgets):
        raise AssertionError(f"{method.name} produced invalid layer budgets {budgets}")
    return budgets


def shared_scores(scores: torch.Tensor, shard: HeadShard = WHOLE) -> torch.Tensor:
    """[kv_heads, n] -> the mean over every KV head of the layer (all tensor-parallel
    ranks'), the same row for each head, so each keeps the same tokens."""
    mean = shard.all_query_heads(scores).mean(dim=0)
    return mean.expand(scores.shape[0], -1).clone()


def chunk_starts(span: tuple[int, int], chunk: int | str,
                 sentence_ends: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending positions where the evictable span's chunks start: every ``chunk`` tokens,
    or after each token that ends a sentence (``sentence_ends``: bool [n])."""
    start, end = span
    if isinstance(chunk, int):
        return torch.arange(start, end, chunk)
    if sentence_ends is None:
        raise ValueError("chunk=sentence needs the prompt's sentence ends (the engine passes "
                         "them from its tokenizer)")
    after = torch.nonzero(sentence_ends[start:end - 1].cpu()).flatten() + start + 1
    return torch.cat([torch.tensor([start]), after])


def chunk_priority(scores: torch.Tensor, span: tuple[int, int],
                   starts: torch.Tensor) -> torch.Tensor:
    """Scores rewritten so that ``select_kept`` keeps whole chunks.

    scores: [kv_heads, n]; ``starts``: where each chunk of the span begins. Chunks are
    ranked by their tokens' mean score (the summed score, for chunks of equal length), ties
    to the earlier chunk; inside the span a token's new score orders it by its chunk's
    rank, then by its own score. Keeping the top ``keep`` then takes the best chunks whole,
    and the best tokens of the next chunk for a remainder shorter than it, so every budget
    is met exactly.
    """
    start, end = span
    kv_heads, n_doc = scores.shape[0], end - start
    if n_doc == 0:
        return scores
    inside = scores[:, start:end].double()
    chunk_of = torch.searchsorted(starts.to(scores.device),
                                  torch.arange(start, end, device=scores.device), right=True) - 1
    n_chunks = len(starts)
    sums = torch.zeros(kv_heads, n_chunks, dtype=inside.dtype, device=scores.device)
    sums.index_add_(1, chunk_of, inside)
    means = sums / torch.bincount(chunk_of, minlength=n_chunks)
    order = torch.sort(means, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n_chunks, device=scores.device).expand(kv_heads, -1))
    # lexicographic (chunk rank, then token score): sort by the minor key, then the major
    by_score = torch.sort(inside, dim=1, descending=True, stable=True).indices
    by_chunk = torch.sort(rank.gather(1, chunk_of[by_score]), dim=1, stable=True).indices
    token_order = by_score.gather(1, by_chunk)  # [kv_heads, n_doc], best first
    priority = torch.empty_like(inside).scatter_(
        1, token_order, torch.arange(n_doc, 0, -1, dtype=inside.dtype,
                                     device=scores.device).expand(kv_heads, -1))
    out = scores.double().clone()
    out[:, start:end] = priority
    return out


def kept_positions(
    spec: CompressionSpec, keys: list[torch.Tensor], queries: list[torch.Tensor],
    span: tuple[int, int], shard: HeadShard = WHOLE,
    reconstruction: list[torch.Tensor] | None = None,
    sentence_ends: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per layer, [kv_heads, kept] positions to keep (padded, under ``heads=ranked``), by
    the shared scoring code.

    keys[layer]: [kv_heads, n, d]; queries[layer]: [q_heads, m, d] (the prompt's last m);
    ``shard``: the KV heads these are, under tensor parallelism (``heads=ranked`` ranks the
    heads a rank holds); ``reconstruction[layer]``: [kv_heads, n] what the reconstruction
    passes scored (``kvzip.ReconstructionScores``), for methods that score with them;
    ``sentence_ends``: bool [n], the tokens that end a sentence, for ``chunk=sentence``.
    Scores only choose indices, so no gradient flows through them; they are computed in
    float32 whatever the cache's dtype, so bfloat16 rounding does not decide ties.
    """
    method = spec.build()
    n_layers = len(keys)
    n_doc = span[1] - span[0]
    budgets = layer_budgets(method, spec.kept(n_doc), n_layers, n_doc)
    if method.reconstruction and reconstruction is None:
        raise ValueError(f"{method.name} scores with a reconstruction pass; none was given")
    starts = chunk_starts(span, spec.chunk, sentence_ends) if spec.chunk is not None else None
    out = []
    with torch.no_grad():
        for layer, (k, q) in enumerate(zip(keys, queries, strict=True)):
            rec = reconstruction[layer] if reconstruction is not None else None
            inp = ScoringInput(k.detach().float(), q.detach().float(), layer, n_layers, shard,
                               None if rec is None else rec.detach().float())
            scores = method.score(inp)
            if spec.ranked_heads:
                out.append(select_ranked(scores, span, budgets[layer], starts))
                continue
            if spec.shared_heads:
                scores = shared_scores(scores, shard)
            if starts is not None:
                scores = chunk_priority(scores, span, starts)
            out.append(select_kept(scores, span, budgets[layer]))
    return out
