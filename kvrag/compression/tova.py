"""TOVA (Oren et al., 2024, arXiv 2401.06104): keep what the last token attends to.

Score = the last prompt query's softmax attention, averaged over all query heads of the
layer, the same for every KV head (the paper's head-averaged policy, as in kvpress's
``TOVAPress``). Under tensor parallelism the average is over every rank's heads
(``HeadShard.all_query_heads``), so each rank keeps what a single rank would.
"""

from __future__ import annotations

import torch

from kvrag.compression.base import Method, ScoringInput, causal_attention, register_method


@register_method
class TOVA(Method):
    name = "tova"
    pools_heads = True

    def queries_needed(self) -> int:
        return 1

    def score(self, inp: ScoringInput) -> torch.Tensor:
        last = torch.tensor([inp.n - 1], device=inp.keys.device)
        attn = causal_attention(inp.queries[:, -1:], inp.keys, last)[:, 0]  # [q_heads, n]
        pooled = inp.shard.all_query_heads(attn).mean(dim=0)
        return pooled.expand(inp.keys.shape[0], -1).clone()
