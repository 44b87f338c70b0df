"""Random: the floor every method must beat. Seeded, so a run is reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrag.compression.base import Method, ScoringInput, register_method


@register_method
@dataclass
class RandomScores(Method):
    name = "random"
    seed: int = 0

    def score(self, inp: ScoringInput) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + inp.layer)
        return torch.rand(inp.keys.shape[:2], generator=gen).to(inp.keys.device)
