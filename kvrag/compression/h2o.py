"""H2O (Zhang et al., 2023, arXiv 2306.14048): keep the heavy hitters.

A token's score is the attention it accumulates from every prompt query during prefill
(causal softmax, summed over queries, averaged over the query heads of a GQA group), the
paper's accumulated-attention criterion applied once after prefill.
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
    chunk: int = 512  # queries per step, bounding memory to q_heads x chunk x n floats

    def score(self, inp: ScoringInput) -> torch.Tensor:
        total = torch.zeros(inp.queries.shape[0], inp.n)
        for start in range(0, inp.n, self.chunk):
            positions = torch.arange(start, min(start + self.chunk, inp.n))
            attn = causal_attention(inp.queries[:, positions], inp.keys, positions)
            total += attn.sum(dim=1)
        return group_mean(total, inp.group)
