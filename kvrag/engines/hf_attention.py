"""kvrag's attention function for HF transformers: SDPA plus hooks.

During a prefill it can record every layer's queries (after RoPE) for the scoring
methods, or hand them with the layer's keys to a callback (KVzip's reconstruction
passes score as they run); during decoding it can restrict each query head to its top-k
document keys (retrieval attention); over a cache whose KV heads keep different counts
(``heads=ranked``, padded to one width) it masks each head's padding. With none active
it is exactly ``sdpa``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvrag.compression.retrieval import RetrievalAttention

NAME = "kvrag"


@dataclass
class AttentionHooks:
    #: layer -> the prompt's last queries [q_heads, m, head_dim], filled during prefill
    captured: dict[int, torch.Tensor] | None = None
    #: how many trailing queries to keep (None: all)
    capture_last: int | None = 64
    #: (document span, k) for retrieval attention during decoding
    retrieval: tuple[tuple[int, int], int] | None = None
    #: called with (layer, queries [q_heads, q_len, d], keys [kv_heads, kv_len, d])
    observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
    #: per layer, bool [kv_heads, width]: which of a padded cache's first ``width``
    #: entries each KV head really holds (entries after them are the tokens since)
    head_valid: list[torch.Tensor] | None = None


_HOOKS: ContextVar[AttentionHooks | None] = ContextVar("kvrag_attention_hooks", default=None)


@contextmanager
def attention_hooks(hooks: AttentionHooks):
    token = _HOOKS.set(hooks)
    try:
        yield hooks
    finally:
        _HOOKS.reset(token)


def kvrag_attention(module, query, key, value, attention_mask, **kwargs):
    """query: [1, q_heads, q_len, d]; key/value: [1, kv_heads, kv_len, d]."""
    hooks = _HOOKS.get()
    if hooks is not None:
        if hooks.observe is not None:
            hooks.observe(module.layer_idx, query[0], key[0])
        if hooks.head_valid is not None:
            attention_mask = _mask_padding(hooks.head_valid[module.layer_idx], query, key,
                                           attention_mask)
        if hooks.captured is not None:
            q_len = query.shape[2]
            last = q_len if hooks.capture_last is None else min(hooks.capture_last, q_len)
            hooks.captured[module.layer_idx] = query[0, :, q_len - last:]
        elif hooks.retrieval is not None and query.shape[2] == 1:
            span, k = hooks.retrieval
            mask = RetrievalAttention.decode_mask(query[0, :, 0], key[0], span, k)
            attention_mask = mask[None, :, None, :]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _mask_padding(valid: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """``mask`` (None: causal, aligned to the end of the keys) and-ed with ``valid``'s
    padding, as a bool mask [1, q_heads, q_len, kv_len]."""
    q_len, kv_len = query.shape[2], key.shape[2]
    heads = torch.cat([valid, valid.new_ones(valid.shape[0], kv_len - valid.shape[1])], 1)
    heads = heads.repeat_interleave(query.shape[1] // key.shape[1], dim=0)[None, :, None]
    if mask is None:
        at = torch.arange(kv_len - q_len, kv_len, device=key.device)
        mask = (torch.arange(kv_len, device=key.device) <= at[:, None])[None, None]
    elif mask.dtype != torch.bool:
        mask = mask == 0
    return mask[..., :kv_len] & heads


AttentionInterface.register(NAME, kvrag_attention)
# Without a registered mask function transformers builds no mask for a custom attention:
# SDPA then aligns its causal mask top-left, which is wrong whenever several tokens run
# over a cache (compression-aware training scores its targets that way), and padding is
# ignored. SDPA's own masks are exactly what this function needs.
AttentionMaskInterface.register(NAME, sdpa_mask)
