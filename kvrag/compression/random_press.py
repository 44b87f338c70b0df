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
        kv_heads, n = inp.keys.shape[:2]
        # drawn for every head, so a tensor-parallel rank's share equals its heads' rows
        total = inp.shard.total or kv_heads
        scores = torch.rand((total, n), generator=gen)
        return scores[inp.shard.offset:inp.shard.offset + kv_heads].to(inp.keys.device)
