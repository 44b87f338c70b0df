"""Compression in the training loop: a prompt's compressed KV cache, with gradients, and
what the model predicts from it.

SFT's ``--compress`` scores its targets this way and GRPO's samples and scores its
completions this way, so an adapter learns to answer from what a compressed server keeps.
The kept positions come from the same scoring code the engines use (question-aware: the
whole prompt is prefilled before the documents are compressed); gradients reach the
prompt through the kept entries, the selection itself is not differentiated. KVzip's
reconstruction passes run over the prompt's cache without gradients; heads keeping
different counts (``heads=ranked``) are padded and masked as in the HF engine.
"""

from __future__ import annotations

import torch

from kvrag.compression import CompressionSpec, kept_positions
from kvrag.compression.sentences import sentence_ends_for
from kvrag.engines.hf_attention import attention_hooks


def compressed_prefill(model, prompt_ids: torch.Tensor, span: tuple[int, int],
                       spec: CompressionSpec, tokenizer=None):
    """Prefill ``prompt_ids`` [1, n], compress its documents' cache (``tokenizer``: what
    ``chunk=sentence`` and KVzip's reconstruction prompt need).

    Returns (cache of the kept entries, logits [1, 1, vocab] of the token after the prompt,
    the attention hooks that mask the cache's padding while it is read).
    """
    from kvrag.compression.kvzip import RepeatTokens
    from kvrag.engines import hf_attention
    from kvrag.engines.hf import gather_cache, pad_kept
    from kvrag.engines.reconstruction import reconstruction_scores

    method = spec.build()
    hooks = hf_attention.AttentionHooks(captured={}, capture_last=method.queries_needed())
    with hf_attention.attention_hooks(hooks):
        out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
    layers = out.past_key_values.layers
    rebuilt = None
    if method.reconstruction:
        if tokenizer is None:
            raise ValueError(f"{spec.name} reconstructs the documents, which needs the "
                             "tokenizer")
        rebuilt = reconstruction_scores(model, out.past_key_values, prompt_ids[0].tolist(),
                                        span, method, RepeatTokens.of(tokenizer))
    kept = kept_positions(spec, [layer.keys[0] for layer in layers],
                          [hooks.captured[i] for i in range(len(layers))], span,
                          reconstruction=rebuilt,
                          sentence_ends=sentence_ends_for(spec, prompt_ids[0], tokenizer))
    padded, valid = pad_kept(kept)
    reading = hf_attention.AttentionHooks(head_valid=valid)
    return gather_cache(out.past_key_values, padded), out.logits[:, -1:], reading


def continuation_logits(model, prompt_ids: torch.Tensor, continuation: torch.Tensor,
                        span: tuple[int, int], spec: CompressionSpec,
                        tokenizer=None) -> torch.Tensor:
    """Logits [rows, m, vocab] predicting each of the ``continuation`` [rows, m] tokens
    after ``prompt_ids`` [1, n], read from the prompt's compressed cache (prefilled once for
    every row) at the tokens' real positions."""
    cache, first, reading = compressed_prefill(model, prompt_ids, span, spec, tokenizer)
    n, (rows, m) = prompt_ids.shape[1], continuation.shape
    first = first.expand(rows, -1, -1)
    if m == 1:
        return first
    if rows > 1:
        cache = expand_cache(cache, rows)
    positions = torch.arange(n, n + m - 1, device=prompt_ids.device).expand(rows, -1)
    with attention_hooks(reading):
        if len({layer.keys.shape[2] for layer in cache.layers}) == 1:
            rest = model(input_ids=continuation[:, :-1], position_ids=positions,
                         past_key_values=cache).logits
        else:
            # layers keep different counts (pyramidkv) and transformers builds one mask,
            # for layer 0's length: one token at a time needs no mask
            rest = torch.cat([model(input_ids=continuation[:, t:t + 1],
                                    position_ids=positions[:, t:t + 1],
                                    past_key_values=cache).logits for t in range(m - 1)],
                             dim=1)
    return torch.cat([first, rest], dim=1)


def expand_cache(cache, rows: int):
    """``cache`` of batch 1 repeated ``rows`` times (one copy per sampled completion)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for layer, entry in enumerate(cache.layers):
        out.update(entry.keys.expand(rows, -1, -1, -1).contiguous(),
                   entry.values.expand(rows, -1, -1, -1).contiguous(), layer)
    return out


@torch.no_grad()
def sample_compressed(model, prompt_ids: list[int], span: tuple[int, int],
                      spec: CompressionSpec, rows: int, max_new_tokens: int,
                      temperature: float, stop: set[int],
                      generator: torch.Generator | None = None,
                      tokenizer=None) -> list[list[int]]:
    """``rows`` completions sampled at ``temperature`` from the compressed prompt cache;
    each ends with its first ``stop`` token, or after ``max_new_tokens``."""
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    cache, first, reading = compressed_prefill(model, ids, span, spec, tokenizer)
    cache = expand_cache(cache, rows)
    logits = first[:, -1].expand(rows, -1)
    stop_t = torch.tensor(sorted(stop), device=device)
    out = torch.empty(rows, 0, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        out = torch.cat([out, token[:, None]], dim=1)
        done |= torch.isin(token, stop_t)
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        position = torch.full((rows, 1), len(prompt_ids) + t, device=device)
        with attention_hooks(reading):
            logits = model(input_ids=token[:, None], position_ids=position,
                           past_key_values=cache, use_cache=True).logits[:, -1]
    completions = []
    for row in out.tolist():
        end = next((i for i, tok in enumerate(row) if tok in stop), len(row) - 1)
        completions.append(row[:end + 1])
    return completions
