"""Key-norm (Devoto et al., 2024, arXiv 2406.11430): keys with a low L2 norm draw attention.

Score = minus the key's norm, per KV head, as in kvpress's ``KnormPress``.
"""

from __future__ import annotations

import torch

from kvrag.compression.base import Method, ScoringInput, register_method


@register_method
class KNorm(Method):
    name = "knorm"

    def score(self, inp: ScoringInput) -> torch.Tensor:
        return -inp.keys.norm(dim=-1)
