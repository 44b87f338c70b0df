"""SnapKV (Li et al., 2024, arXiv 2404.14469): keep what the prompt's last queries attend to.

Defaults follow the SnapKV repository and NVIDIA kvpress's ``SnapKVPress``: an
observation window of the last 64 prompt tokens; their softmax attention over all keys
(causal inside the window), averaged over the window and over the query heads of each
GQA group; the scores of the tokens before the window are smoothed by 1-D average
pooling with kernel 5 (stride 1, zero padding). The window itself always scores highest,
so it is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvrag.compression.base import (
    Method,
    ScoringInput,
    causal_attention,
    group_mean,
    register_method,
)


def snapkv_scores(inp: ScoringInput, window: int, kernel: int) -> torch.Tensor:
    """[kv_heads, n]; the last ``window`` tokens get +inf.

    Fewer queries than ``window`` (SGLang computed only the prompt's tail, the rest came
    from its radix cache) shrink the window to the queries there are.
    """
    w = min(window, inp.n, inp.queries.shape[1])
    positions = torch.arange(inp.n - w, inp.n, device=inp.keys.device)
    attn = causal_attention(inp.queries[:, -w:], inp.keys, positions)  # [q_heads, w, n]
    scores = group_mean(attn.mean(dim=1), inp.group)  # [kv_heads, n]
    # Pool only the tokens before the window, as both references do.
    before = F.avg_pool1d(scores[:, None, : inp.n - w], kernel, stride=1,
                          padding=kernel // 2)[:, 0]
    return torch.cat([before, torch.full_like(scores[:, inp.n - w:], float("inf"))], dim=1)


@register_method
@dataclass
class SnapKV(Method):
    name = "snapkv"
    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("snapkv needs window >= 1 and an odd kernel >= 1")

    def score(self, inp: ScoringInput) -> torch.Tensor:
        return snapkv_scores(inp, self.window, self.kernel)

    def queries_needed(self) -> int:
        return self.window
