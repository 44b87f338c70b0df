"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks plus a recent window.

Scores the first 4 tokens of the sequence highest (the sinks, as in the paper and
kvpress's ``StreamingLLMPress`` default n_sink=4), then the most recent. In kvrag's prompts
those first tokens sit in the system turn, which is never evicted anyway, so in practice
the whole non-document prefix acts as the sink and the documents keep their latest tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrag.compression.base import Method, ScoringInput, register_method


@register_method
@dataclass
class StreamingLLM(Method):
    name = "streamingllm"
    n_sink: int = 4

    def score(self, inp: ScoringInput) -> torch.Tensor:
        positions = torch.arange(inp.n, dtype=torch.float32, device=inp.keys.device)
        scores = positions.expand(inp.keys.shape[0], -1).clone()
        scores[:, : self.n_sink] = float("inf")
        return scores
