"""Choosing the kept tokens from scores: the one selection rule every engine uses."""

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


def layer_budgets(method: Method, keep: int, n_layers: int, n_evictable: int) -> list[int]:
    """Per-layer kept counts, checked to average exactly ``keep``."""
    budgets = method.layer_budgets(keep, n_layers, n_evictable)
    if sum(budgets) != keep * n_layers or not all(0 <= b <= n_evictable for b in budgets):
        raise AssertionError(f"{method.name} produced invalid layer budgets {budgets}")
    return budgets


def kept_positions(
    spec: CompressionSpec, keys: list[torch.Tensor], queries: list[torch.Tensor],
    span: tuple[int, int], shard: HeadShard = WHOLE,
    repeat: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Per layer, [kv_heads, kept] positions to keep, by the shared scoring code.

    keys[layer]: [kv_heads, n, d]; queries[layer]: [q_heads, m, d] (the prompt's last m);
    ``shard``: the KV heads these are, under tensor parallelism; ``repeat[layer]``: the
    (queries, keys) of a reconstruction pass, for methods that score with one.
    Scores only choose indices, so no gradient flows through them; they are computed in
    float32 whatever the cache's dtype, so bfloat16 rounding does not decide ties.
    """
    method = spec.build()
    n_layers = len(keys)
    n_doc = span[1] - span[0]
    budgets = layer_budgets(method, spec.kept(n_doc), n_layers, n_doc)
    if method.reconstruction and repeat is None:
        raise ValueError(f"{method.name} scores with a reconstruction pass; none was given")
    out = []
    with torch.no_grad():
        for layer, (k, q) in enumerate(zip(keys, queries, strict=True)):
            rq, rk = repeat[layer] if repeat is not None else (None, None)
            inp = ScoringInput(k.detach().float(), q.detach().float(), layer, n_layers, shard,
                               None if rq is None else rq.detach().float(),
                               None if rk is None else rk.detach().float())
            out.append(select_kept(method.score(inp), span, budgets[layer]))
    return out
