"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks plus a recent window.

Keeps the first 4 tokens of the sequence (the sinks, as in the paper and kvpress's
``StreamingLLMPress`` default n_sink=4) and otherwise the most recent tokens.
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
        scores = torch.arange(inp.n, dtype=torch.float32).expand(inp.keys.shape[0], -1).clone()
        scores[:, : self.n_sink] = float("inf")
        return scores
