"""A ``once:...+recall`` question's recall inside SGLang (the definition is
``compression/recall.py``'s).

The question runs twice through the scheduler, as prefill chunks of the request itself:

1. its prompt holds the question twice; the first copy runs over the kept corpus (the
   stored prefix for a hit, the compacted one for the request that built it) as a middle
   chunk, cut where it ends, so nothing is sampled; its last queries are kept
   (``capture.py``);
2. ``recall`` scores the corpus's evicted entries (the host store) with those queries and
   the keys in the pool, frees the first copy's slots, copies the chosen entries into
   newly allocated slots, places them in the request's row right after the corpus, and
   rewinds the request to there (its prompt now has one placeholder id per recalled
   entry, then the question);
3. the question's second copy extends the request over corpus and recalled entries, its
   positions shifted back to the logical ones (``once.PositionShifts``), and is sampled.

Slot ownership: the recalled slots are the request's own, in its row like prompt tokens
it prefilled, so SGLang frees them with the request (``rows.release_ranges`` for a
compacted builder); the stored corpus stays the tree's.
"""

from __future__ import annotations

import logging
import time
from array import array

import torch

from kvrag.compression.recall import HostStore, recall_indices, recalled_positions
from kvrag.engine_plugin import once

logger = logging.getLogger(__name__)

PLACEHOLDER = 0  # the prompt id standing for a recalled entry (its KV is already there)


def pass_done(state, req) -> bool:
    """Whether ``req``'s scoring pass has just run and its recall is due."""
    stored = req.kvrag.once
    run = stored.recall
    return (run is not None and run.pending and state.queries.prefilled(req.kv.req_pool_idx)
            == stored.question_start + stored.question)


def recall(state, req, allocator, tree_cache) -> None:
    """Score, copy in and place the question's recalled entries, and rewind it for its
    second prefill (module docstring, step 2)."""
    t0 = time.perf_counter()
    stored, kv = req.kvrag.once, req.kv
    row = kv.req_pool_idx
    resident = state.rows.resident.get(row)
    host: HostStore = (resident.record.host if resident is not None
                       else state.host_stores[stored.layout_key])
    read_row = row if resident is None else resident.row  # kept corpus, then the question
    start, kmax = stored.question_start, stored.kmax
    req_to_token = state.rows.req_to_token
    slots = req_to_token[read_row, :kmax + stored.question]
    tail = state.queries.pop(row)
    pool, layer_ids = state.rows.pool, state.rows.layer_ids
    keys = [pool.get_key_buffer(lid)[slots].transpose(0, 1) for lid in layer_ids]
    indices = recall_indices(
        req.kvrag.spec, [tail.layers[lid].transpose(0, 1) for lid in layer_ids],
        [k[:, :kmax] for k in keys], [k[:, kmax:] for k in keys], host, req.kvrag.span,
        state.rows.shard)
    allocator.free(req_to_token[row, start:kv.kv_allocated_len].clone())
    count = int(indices[0].numel())
    recalled = _alloc(allocator, tree_cache, count) if count else slots[:0]
    if recalled is None:
        logger.warning("kvrag: no free slots for the %d entries request %s recalls; it "
                       "answers without them", count, req.rid)
        count, indices = 0, [idx[:0] for idx in indices]
        recalled = slots[:0]
    for lid, idx in zip(layer_ids, indices, strict=True):
        kbuf, vbuf = pool.get_key_buffer(lid), pool.get_value_buffer(lid)
        k, v = host.fetch(lid - layer_ids[0], idx, kbuf.device, kbuf.dtype)
        kbuf[recalled], vbuf[recalled] = k, v
    req_to_token[row, start:start + count] = recalled.to(req_to_token.dtype)
    if resident is not None:
        req_to_token[resident.row, kmax:kmax + count] = recalled.to(req_to_token.dtype)
    kv.kv_committed_len = kv.kv_allocated_len = start + count
    req.prefix_len = req.extend_end = start + count
    run = stored.recall
    run.pending, run.tokens = False, count
    run.positions = recalled_positions(host, indices) if state.settings.record_kept else None
    run.host_bytes = host.nbytes
    head = stored.key if stored.state == "hit" else stored.real[:stored.end]
    prompt = head + array("q", [PLACEHOLDER] * count) + stored.question_ids()
    once.set_prompt(req, prompt, req.extra_key)
    _restart_input_logprobs(req, len(prompt) - len(stored.real))
    run.seconds = time.perf_counter() - t0


def _restart_input_logprobs(req, moved: int) -> None:
    """Input log-probabilities are the second prefill's: the scoring pass's are dropped,
    and where they start moves with the prompt's end (a client asking for the last prompt
    token's gets it from the prompt the question now ends)."""
    req.input_token_logprobs = None
    req.temp_input_top_logprobs_val = req.temp_input_top_logprobs_idx = None
    req.temp_input_token_ids_logprobs_val = req.temp_input_token_ids_logprobs_idx = None
    if req.logprob_start_len >= 0:
        req.logprob_start_len = max(0, req.logprob_start_len + moved)


def _alloc(allocator, tree_cache, count: int) -> torch.Tensor | None:
    slots = allocator.alloc(count)
    if slots is None:
        allocator.evict_to_free_tokens(tree_cache, count)
        slots = allocator.alloc(count)
    return slots


def report(stored) -> dict:
    """What a recalling question reports beside its held slots."""
    run = stored.recall
    line = {"recalled_tokens": run.tokens, "recall_seconds": run.seconds,
            "host_kv_bytes": run.host_bytes}
    if run.positions is not None:
        line["recalled"] = run.positions
    return line
