"""KVzip's reconstruction passes over an HF cache (the definition is ``kvzip.py``'s).

Used by the HF engine and by compression-aware training: each pass runs over the
prompt's cache at the positions after it, its queries are scored layer by layer as the
forward computes them (no pass's queries are kept), and each layer's cache tensors are
put back as they were before the next pass (the same tensors, so a training graph
through them is kept).
"""

from __future__ import annotations

import torch

from kvrag.compression.kvzip import KVzip, PassAttention, ReconstructionScores, RepeatTokens
from kvrag.engines import hf_attention


@torch.no_grad()
def reconstruction_scores(model, cache, ids, span: tuple[int, int], method: KVzip,
                          tokens: RepeatTokens) -> list[torch.Tensor]:
    """Per layer, [kv_heads, n] scores of the ``n = len(ids)`` prompt positions whose
    cache ``cache`` holds (left as it was)."""
    n = len(ids)
    device = cache.layers[0].keys.device
    scores = ReconstructionScores(method, n)
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    for rep in method.passes(ids, span, tokens):
        def observe(layer: int, queries: torch.Tensor, keys: torch.Tensor, rep=rep) -> None:
            scores.add(layer, keys, rep, PassAttention(queries, keys[:, n:]))

        r = len(rep.ids)
        with hf_attention.attention_hooks(hf_attention.AttentionHooks(observe=observe)):
            model(input_ids=torch.tensor([rep.ids], device=device),
                  position_ids=torch.arange(n, n + r, device=device)[None],
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
        for layer, (keys, values) in zip(cache.layers, saved, strict=True):
            layer.keys, layer.values = keys, values
    return [scores.by_layer[layer] for layer in range(len(cache.layers))]
