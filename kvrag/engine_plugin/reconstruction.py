"""KVzip's reconstruction passes inside SGLang, for a request building a ``once:kvzip``
corpus prefix (the scoring definition is ``compression/kvzip.py``'s).

The passes run as prefill chunks of the request itself, through SGLang's scheduler:

1. its corpus prefix ``[0, end)`` is prefilled (the chunk is cut at ``end``, as for any
   compress-once build);
2. its prompt is rewritten to ``prefix + pass ids + question``, and the next chunk, cut
   where the pass ends, extends the request with the pass's tokens at positions
   ``end, end + 1, ...`` without sampling (a middle chunk); chunked prefill may split it
   further. As each chunk's forward runs, the attention backend hands every layer's
   queries here, and they are scored against the prompt's keys and the pass's own keys in
   the pool (``Rebuilds.score``), so no pass's queries are kept;
3. when the pass is done, its slots go back to the allocator and the request's lengths
   are rewound to ``end`` (``rewind``); the next pass goes the same way;
4. after the last pass the prompt is put back, the prefix is compacted with the scores,
   and the question extends it, as for every compress-once build.

Slot ownership: a pass's slots are the request's own, allocated by SGLang for the chunk
and freed by ``rewind`` before anything else runs on them; the tree never sees them (the
request is ``skip_radix_cache_insert``).
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

import torch

from kvrag.compression.kvzip import (
    KVzip,
    PassAttention,
    ReconstructionScores,
    RepeatPass,
    RepeatTokens,
)


@dataclass
class Rebuild:
    """One request's reconstruction: its passes, which it is on, the scores so far."""

    end: int  # the corpus prefix [0, end) is being scored
    passes: list[RepeatPass]
    scores: ReconstructionScores
    index: int = 0  # the pass running now
    done: int = 0  # its tokens whose queries were scored
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, method: KVzip, real, span: tuple[int, int], tokenizer) -> Rebuild:
        passes = method.passes(real, span, RepeatTokens.of(tokenizer))
        return cls(span[1], passes, ReconstructionScores(method, span[1]))

    @property
    def current(self) -> RepeatPass | None:
        return self.passes[self.index] if self.index < len(self.passes) else None

    @property
    def cut(self) -> int | None:
        """Where the request's current prefill chunk must end: after the running pass."""
        rep = self.current
        return None if rep is None else self.end + len(rep.ids)

    def prompt(self, real) -> array:
        """The request's prompt while the current pass runs (``real`` once all are done)."""
        rep = self.current
        if rep is None:
            return array("q", real)
        return array("q", real[:self.end]) + array("q", rep.ids) + array("q", real[self.end:])

    def reconstruction(self, layers: int) -> list[torch.Tensor]:
        return [self.scores.by_layer[layer] for layer in range(layers)]

    def report(self) -> dict:
        """For the request's stats line: its passes, their tokens, the seconds from the
        prefix's end to the last pass's end (the scheduler's other work included)."""
        return {"passes": len(self.passes), "pass_tokens": sum(len(p.ids) for p in self.passes),
                "rebuild_seconds": time.perf_counter() - self.started}


def rewind(req, rebuild: Rebuild, req_to_token, allocator) -> None:
    """A pass is done: free its slots, rewind the request to its prefix end, and move on
    to the next pass (or back to the real prompt)."""
    end, kv = rebuild.end, req.kv
    row = kv.req_pool_idx
    allocator.free(req_to_token[row, end:kv.kv_allocated_len].clone())
    kv.kv_committed_len = kv.kv_allocated_len = end
    req.prefix_len = req.extend_end = end
    rebuild.index += 1
    rebuild.done = 0


@dataclass
class Rebuilds:
    """The requests whose reconstruction pass runs in the coming extend, by row, scored
    as the forward goes (the backend calls ``score`` for every layer)."""

    layer_ids: list[int]
    by_row: dict[int, Rebuild] = field(default_factory=dict)
    _announced: list[int] | None = None  # the coming extend's rows, in batch order
    _extend: list[int] | None = None

    def announce(self, rows: list[int], rebuilds: list[Rebuild | None]) -> None:
        for row, rebuild in zip(rows, rebuilds, strict=True):
            if rebuild is None:
                self.by_row.pop(row, None)
            else:
                self.by_row[row] = rebuild
        self._announced = rows if any(r is not None for r in rebuilds) else None

    def begin(self, forward_batch) -> None:
        self._extend, self._announced = self._announced, None
        if not forward_batch.forward_mode.is_extend():
            self._extend = None

    def score(self, q: torch.Tensor, layer, forward_batch, pool, req_to_token) -> None:
        """Score this layer's queries of every pass in the extend (their keys are in the
        pool by now)."""
        if self._extend is None:
            return
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        kbuf = pool.get_key_buffer(layer.layer_id)
        start = 0
        for row, pre, length in zip(self._extend, forward_batch.extend_prefix_lens_cpu,
                                    forward_batch.extend_seq_lens_cpu, strict=True):
            rebuild = self.by_row.get(row)
            rep = None if rebuild is None else rebuild.current
            if rep is not None and pre >= rebuild.end:
                offset = pre - rebuild.end
                slots = req_to_token[row, :pre + length]
                keys = kbuf[slots[:rebuild.end]].transpose(0, 1)  # [kv_heads, end, d]
                own = kbuf[slots[rebuild.end:]].transpose(0, 1)
                seen = PassAttention(q[start:start + length].transpose(0, 1), own, offset)
                rebuild.scores.add(layer.layer_id - self.layer_ids[0], keys, rep, seen)
                if layer.layer_id == self.layer_ids[-1]:
                    rebuild.done = offset + length
            start += length

    def drop(self, row: int) -> None:
        self.by_row.pop(row, None)
