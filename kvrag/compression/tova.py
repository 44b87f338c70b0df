"""TOVA (Oren et al., 2024, arXiv 2401.06104): keep what the last token attends to.

Score = the last prompt query's softmax attention, averaged over all query heads of the
layer, the same for every KV head (the paper's head-averaged policy, as in kvpress's
``TOVAPress``).
"""

from __future__ import annotations

import torch

from kvrag.compression.base import Method, ScoringInput, causal_attention, register_method


@register_method
class TOVA(Method):
    name = "tova"

    def queries_needed(self) -> int:
        return 1

    def score(self, inp: ScoringInput) -> torch.Tensor:
        last = torch.tensor([inp.n - 1], device=inp.keys.device)
        attn = causal_attention(inp.queries[:, -1:], inp.keys, last)[:, 0]  # [q_heads, n]
        return attn.mean(dim=0).expand(inp.keys.shape[0], -1).clone()
