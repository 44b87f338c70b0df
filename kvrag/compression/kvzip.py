"""KVzip-style context reconstruction (Kim et al., 2025, arXiv 2505.23416).

A question-agnostic score: after the prompt, the engine runs one more forward pass in
which the model is asked to repeat its documents (``REPEAT_PROMPT`` then the document
tokens, teacher-forced), and each cached KV entry is scored by the most attention any
query of that pass gives it (softmax over the cached keys and the pass's own earlier
keys), the maximum taken over the query heads of its GQA group, as in KVzip. What the
model needs to rebuild the context is what it keeps, whatever the question will be.

Simplifications against the paper: the score is per (layer, KV head) and the budget is
uniform over heads (KVzip can also spread it over heads non-uniformly), and the
reconstruction pass repeats the documents only (the always-kept header and question need
no score). Its cost is that extra forward pass over the documents; ``kvrag bench
compression --methods kvzip`` reports it against the prefill.
"""

from __future__ import annotations

import torch

from kvrag.compression.base import Method, ScoringInput, register_method

REPEAT_PROMPT = "\n\nRepeat the documents above exactly.\n"
# Attention-weight elements computed at once, so long contexts are scored in row chunks.
CHUNK_ELEMENTS = 1 << 22


@register_method
class KVzip(Method):
    name = "kvzip"
    reconstruction = True

    def queries_needed(self) -> int:
        return 0

    def score(self, inp: ScoringInput) -> torch.Tensor:
        if inp.repeat_queries is None or inp.repeat_keys is None:
            raise ValueError("kvzip scores with a reconstruction pass; this engine gave none")
        q, rk = inp.repeat_queries, inp.repeat_keys
        group = q.shape[0] // inp.keys.shape[0]
        keys = inp.keys.repeat_interleave(group, dim=0).transpose(1, 2)  # [q_heads, d, n]
        own_keys = rk.repeat_interleave(group, dim=0).transpose(1, 2)
        n, r = inp.n, q.shape[1]
        best = torch.full((q.shape[0], n), float("-inf"), device=q.device, dtype=q.dtype)
        rows = max(1, CHUNK_ELEMENTS // (q.shape[0] * (n + r)))
        for start in range(0, r, rows):
            chunk = q[:, start:start + rows] / q.shape[-1] ** 0.5
            logits = chunk @ keys  # [q_heads, c, n]
            own = chunk @ own_keys  # [q_heads, c, r]: the pass's own keys, causal
            at = torch.arange(start, start + chunk.shape[1], device=q.device)
            own = own.masked_fill(torch.arange(r, device=q.device) > at[:, None], float("-inf"))
            norm = torch.logaddexp(logits.logsumexp(-1), own.logsumexp(-1))  # [q_heads, c]
            best = torch.maximum(best, (logits - norm[..., None]).amax(dim=1))
        # max log-weight over queries, then over the group: exp is monotone, so one exp
        return best.view(-1, group, n).amax(dim=1).exp()
