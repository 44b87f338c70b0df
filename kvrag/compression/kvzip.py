"""KVzip: keep what the model needs to rebuild its context (Kim et al., NeurIPS 2025,
arXiv 2505.23416), scored as its authors do.

The definition, used unchanged by the HF engine and by training (``reconstruction.py``
runs the passes over an HF cache):

1. **Reconstruction prompt in the chat template.** The prompt's user turn is still open
   when its documents end, so each pass closes it with the instruction and lets the
   documents be the assistant's reply: ``INSTRUCTION``, the template's end of the user turn
   and start of the assistant's (``RepeatTokens.suffix``), then the chunk's own tokens,
   teacher-forced. Passes after the first ask to continue from the previous chunk's last
   ``PREV_TAIL`` tokens (``CONTINUE``).
2. **Chunked.** The documents (the evictable span) are repeated ``pass_tokens`` (2,048)
   tokens at a time; each pass runs over the whole prompt's cache at positions after it,
   and its own entries are dropped before the next, so a pass costs about what prefilling
   its chunk costs and the whole reconstruction about one more prefill of the documents.
3. **Local normalisation.** A pass scores only its own chunk: each of its queries is
   softmax-normalised over the prompt's first ``sinks`` keys (the attention sinks), the
   chunk's keys and the pass's own keys up to itself (causal); the score of a chunk key is
   the largest weight any query of the pass gives it, the maximum taken over the query
   heads of its GQA group too. No pass builds more than a chunk x (sinks + 2 chunks)
   matrix, in row blocks.
4. **Sinks kept.** The first ``sinks`` tokens of the prompt always score highest.

How a layer's budget is spread (uniform per KV head, ranked across a layer's heads with
``heads=ranked``, shared) is the selection's (``select.py``), as for any method.

For ablations, ``pass_tokens=0`` repeats all documents in one pass, ``norm=prefix``
normalises each query over the whole prompt (and the pass) instead, and ``sinks=0``
keeps no sink.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvrag.compression.base import Method, ScoringInput, register_method

INSTRUCTION = "\n\nRepeat the previous context exactly."
CONTINUE = "\n\nRepeat the part of the previous context exactly, starting with"
PREV_TAIL = 8  # tokens of the previous chunk a later pass continues from
NORMS = ("local", "prefix")
# attention-weight elements computed at once: passes are scored in row blocks
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class RepeatTokens:
    """The reconstruction prompt's token ids for one tokenizer."""

    instruction: tuple[int, ...]
    continuation: tuple[int, ...]
    suffix: tuple[int, ...]  # closes the user turn, opens the assistant's

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def of(tokenizer) -> RepeatTokens:
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        return RepeatTokens(ids(INSTRUCTION), ids(CONTINUE), ids(turn_suffix(tokenizer)))


def turn_suffix(tokenizer) -> str:
    """The chat template's text between a user message and the assistant's reply ("\\n"
    for a tokenizer without a template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    marker = "\x00kvrag-end-of-user\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                         add_generation_prompt=True, tokenize=False)
    return text.split(marker, 1)[1]


@dataclass(frozen=True)
class RepeatPass:
    """One reconstruction pass: it repeats prompt positions ``[start, end)`` with ``ids``
    (the instruction, the turn suffix, then those positions' own tokens)."""

    start: int
    end: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class PassAttention:
    """One layer's view of (part of) one pass, after RoPE: the queries [q_heads, m, d] of
    pass tokens ``[offset, offset + m)`` and the pass's own keys [kv_heads, >= offset + m,
    d] from its first token (a server may run a pass in several prefill chunks)."""

    queries: torch.Tensor
    keys: torch.Tensor
    offset: int = 0


@register_method
@dataclass
class KVzip(Method):
    name = "kvzip"
    reconstruction = True

    pass_tokens: int = 2048  # document tokens one pass repeats; 0: all in one pass
    norm: str = "local"  # what a pass's queries are normalised over (see the module doc)
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.pass_tokens < 0 or self.sinks < 0:
            raise ValueError("pass_tokens and sinks are counts (>= 0)")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}")

    def queries_needed(self) -> int:
        return 0

    def passes(self, ids, span: tuple[int, int], tokens: RepeatTokens) -> list[RepeatPass]:
        """The reconstruction passes over the documents ``span`` of prompt ``ids``."""
        start, end = span
        size = self.pass_tokens or max(end - start, 1)
        out = []
        for a in range(start, end, size):
            b = min(a + size, end)
            lead = tokens.instruction if a == start else (
                tokens.continuation + tuple(ids[max(start, a - PREV_TAIL):a]))
            out.append(RepeatPass(a, b, lead + tokens.suffix + tuple(ids[a:b])))
        return out

    def pass_scores(self, keys: torch.Tensor, rep: RepeatPass,
                    seen: PassAttention) -> torch.Tensor:
        """[kv_heads, end - start] scores of the positions ``rep`` repeats, from one layer's
        prompt ``keys`` [kv_heads, n, d] and what the pass computed there."""
        q, off = seen.queries.float(), seen.offset
        own = seen.keys[:, :off + seen.queries.shape[1]].float()
        group = q.shape[0] // keys.shape[0]
        sinks = min(self.sinks, rep.start)
        if self.norm == "local":
            context = torch.cat([keys[:, :sinks], keys[:, rep.start:rep.end]], dim=1)
            lo = sinks  # the chunk's columns within ``context``
        else:
            context, lo = keys, rep.start
        context = context.float().repeat_interleave(group, dim=0).transpose(1, 2)
        own_t = own.repeat_interleave(group, dim=0).transpose(1, 2)  # [q_heads, d, r]
        width, m = rep.end - rep.start, q.shape[1]
        best = torch.full((q.shape[0], width), float("-inf"), device=q.device)
        rows = max(1, BLOCK_ELEMENTS // (q.shape[0] * (context.shape[-1] + off + m)))
        scale = q.shape[-1] ** -0.5
        for a in range(0, m, rows):
            block = q[:, a:a + rows] * scale
            hi = off + a + block.shape[1]  # pass position after the block's last query
            logits = block @ context  # [q_heads, b, ctx]
            mine = block @ own_t[..., :hi]  # [q_heads, b, hi]: causal within the pass
            at = torch.arange(hi - block.shape[1], hi, device=q.device)
            mine = mine.masked_fill(torch.arange(hi, device=q.device) > at[:, None],
                                    float("-inf"))
            norm = torch.logaddexp(logits.logsumexp(-1), mine.logsumexp(-1))
            chunk = logits[..., lo:lo + width] - norm[..., None]
            best = torch.maximum(best, chunk.amax(dim=1))
        # the largest log-weight over queries and the group; exp is monotone, so one exp
        return best.view(-1, group, width).amax(dim=1).exp()

    def score(self, inp: ScoringInput) -> torch.Tensor:
        if inp.reconstruction is None:
            raise ValueError("kvzip scores with a reconstruction pass; this engine gave none")
        scores = inp.reconstruction.clone()
        scores[:, :min(self.sinks, inp.n)] = float("inf")
        return scores


class ReconstructionScores:
    """Per layer, the scores the passes give the prompt's positions ([kv_heads, n],
    zero where no pass scored), filled one pass (or part of one) and layer at a time as
    the engine runs them, so no pass's queries outlive its forward."""

    def __init__(self, method: KVzip, n: int) -> None:
        self.method = method
        self.n = n
        self.by_layer: dict[int, torch.Tensor] = {}

    def add(self, layer: int, keys: torch.Tensor, rep: RepeatPass,
            seen: PassAttention) -> None:
        """``keys``: the layer's prompt keys [kv_heads, >= n, d]."""
        scores = self.by_layer.get(layer)
        if scores is None:
            scores = self.by_layer[layer] = torch.zeros(keys.shape[0], self.n,
                                                        device=keys.device)
        part = self.method.pass_scores(keys[:, :self.n], rep, seen)
        torch.maximum(scores[:, rep.start:rep.end], part, out=scores[:, rep.start:rep.end])
