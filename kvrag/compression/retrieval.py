"""Retrieval attention (the study's method class; Liu et al., 2024, arXiv 2409.10516).

The whole cache stays; from the second answer token on, each query head attends, among
the document tokens, only to its top-k keys by exact q.k, plus every token outside the
documents: the system turn and header act as the sinks, the question and the generated
tokens as the recent window (kvrag's defaults: the study states no sink or window sizes).
k is what the spec keeps. The first answer token comes from the prefill, which saw the
whole context. Memory is not saved; attended tokens are.
"""

from __future__ import annotations

import torch

from kvrag.compression.base import Method, register_method


@register_method
class RetrievalAttention(Method):
    name = "retrieval"
    dynamic = True

    @staticmethod
    def decode_mask(
        query: torch.Tensor, keys: torch.Tensor, span: tuple[int, int], k: int
    ) -> torch.Tensor:
        """Boolean mask [q_heads, n] of the keys one decoded token may attend to.

        query: [q_heads, d] (after RoPE); keys: [kv_heads, n, d].
        """
        group = query.shape[0] // keys.shape[0]
        start, end = span
        logits = torch.einsum("hd,hnd->hn", query, keys.repeat_interleave(group, dim=0))
        mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        mask[:, start:end] = False
        top = logits[:, start:end].topk(k, dim=-1).indices + start
        mask.scatter_(1, top, True)
        return mask
