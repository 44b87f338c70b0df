"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): SnapKV scores, budgets shrinking with depth.

Layer budgets fall linearly from the first to the last layer with the same total as a
uniform split, as in kvpress's ``PyramidKVPress``: the last layer keeps 1/beta of the
mean (beta = 20), the first keeps the rest of twice the mean (capped at the number of
evictable tokens, the cap's excess moving to the last layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvrag.compression.base import Method, ScoringInput, register_method
from kvrag.compression.snapkv import snapkv_scores


@register_method
@dataclass
class PyramidKV(Method):
    name = "pyramidkv"
    uniform_layers = False
    window: int = 64
    kernel: int = 5
    beta: float = 20.0

    def score(self, inp: ScoringInput) -> torch.Tensor:
        return snapkv_scores(inp, self.window, self.kernel)

    def queries_needed(self) -> int:
        return self.window

    def layer_budgets(self, keep: int, n_layers: int, n_evictable: int) -> list[int]:
        if n_layers == 1:
            return [keep]
        low = keep / self.beta
        high = 2 * keep - low
        if high > n_evictable:
            high, low = n_evictable, 2 * keep - n_evictable
        raw = [high - (high - low) * i / (n_layers - 1) for i in range(n_layers)]
        budgets = [math.floor(b) for b in raw]
        # Hand out what flooring lost, largest remainders first, so the total is exact.
        by_remainder = sorted(range(n_layers), key=lambda i: raw[i] - budgets[i], reverse=True)
        for i in by_remainder[: keep * n_layers - sum(budgets)]:
            budgets[i] += 1
        return budgets
