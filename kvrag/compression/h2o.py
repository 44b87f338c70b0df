"""H2O (Zhang et al., 2023, arXiv 2306.14048): keep the heavy hitters.

A token's score is the attention it accumulates from every prompt query during prefill
(causal softmax, summed over queries, averaged over the query heads of a GQA group), the
paper's accumulated-attention criterion applied once after prefill. H2O pairs heavy
hitters with recent tokens; here the recent part is the never-evicted question and
chat-template tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrag.compression.base import (
    Method,
    ScoringInput,
    causal_attention,
    group_mean,
    register_method,
)


@register_method
@dataclass
class H2O(Method):
    name = "h2o"
    query_block: int = 512  # queries per step: memory is q_heads x query_block x n floats

    def queries_needed(self) -> None:
        return None

    def score(self, inp: ScoringInput) -> torch.Tensor:
        if inp.queries.shape[1] != inp.n:
            raise ValueError("h2o scores with every prompt query; capture all of them")
        total = torch.zeros(inp.queries.shape[0], inp.n, device=inp.keys.device)
        for start in range(0, inp.n, self.query_block):
            end = min(start + self.query_block, inp.n)
            positions = torch.arange(start, end, device=inp.keys.device)
            attn = causal_attention(inp.queries[:, positions], inp.keys, positions)
            total += attn.sum(dim=1)
        return group_mean(total, inp.group)
