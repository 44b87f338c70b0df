"""A request's compression from its creation to its release, as SGLang's scheduler events.

Each function here is a hook on the SGLang method it is named after (``register.HOOKS``
says which, of what kind, and why). All of them read and change only the plugin state
(``state.current()``) and the request's ``req.kvrag``; where no kvrag backend runs in the
process they leave SGLang's behaviour as it is.
"""

from __future__ import annotations

import logging

from kvrag.compression import SpecError
from kvrag.compression.sentences import sentence_ends_for
from kvrag.compression.spec import SENTENCE
from kvrag.engine_plugin import config, once, stats
from kvrag.engine_plugin import recall as recall_step
from kvrag.engine_plugin.reconstruction import Rebuild, rewind
from kvrag.engine_plugin.rows import release_ranges
from kvrag.engine_plugin.state import PendingPrefill, PluginState, current

logger = logging.getLogger(__name__)


def req_init(result, req, *args, **kwargs):
    """Read the request's compression once; a compressed request stays out of the radix
    tree (its KV is not the full prefix's), an invalid spec aborts it with the reason."""
    state = current()
    if state is None:
        return result
    try:
        params, req.extra_key = config.request_params(req.sampling_params.custom_params,
                                                      req.extra_key)
        wanted = config.for_request(params, len(req.origin_input_ids), state.settings)
        if wanted is not None and req.session is not None:
            raise SpecError("compression is not served for session requests: a session "
                            "keeps the request's KV row for its next turn")
        if wanted is not None:
            needed = wanted.spec.build().queries_needed()
            have = state.settings.capture
            if have is not None and (needed is None or needed > have):
                raise SpecError(f"{wanted.spec.name} scores with {needed or 'all'} prompt "
                                f"queries but the server keeps {have}; start it with "
                                f"{config.ENV_CAPTURE}=all")
    except (SpecError, TypeError) as err:
        req.set_finish_with_abort(str(err))
        return result
    req.kvrag = wanted
    if wanted is not None:
        req.skip_radix_cache_insert = True
        if wanted.spec.once:
            wanted.once = once.OnceRequest.of(wanted.spec, wanted.span, req.origin_input_ids,
                                              req.extra_key, req.cache_salt)
            wanted.once.stored = (state.stored_layouts, state.host_stores)
    return result


def compute_max_prefix_len(result, req, input_len, *args, **kwargs):
    """A compressed request recomputes at least the prompt queries its method scores with,
    even when the radix tree holds the prefix."""
    state = current()
    if getattr(req, "kvrag", None) is None or state is None:
        return result
    stored = req.kvrag.once
    if stored is not None and stored.state == "hit":
        return result  # nothing is scored: the stored prefix is matched whole
    # the queries scored are the prompt's last ones, or the corpus prefix's for once:; a
    # build prefills at least one prefix token, so its prefix chunk ends where it is cut
    end = stored.end if stored is not None else input_len
    capture = state.queries.keep
    keep = end if capture is None else max(capture, 1 if stored is not None else 0)
    return min(result, max(0, end - keep))


def prepare_for_extend(result, batch, *args, **kwargs):
    """Tell the backend which requests of the coming prefill will be compressed (their
    queries are kept) and the position shift of each compress-once hit."""
    state = current()
    if state is not None:
        rows = [req.kv.req_pool_idx for req in batch.reqs]
        state.queries.announce(rows, [_scores(state, req) for req in batch.reqs])
        state.shifts.announce(rows, [once.position_shift(req) for req in batch.reqs])
        state.rebuilds.announce(rows, [_rebuilding(req) for req in batch.reqs])
        for row, req in zip(rows, batch.reqs, strict=True):
            if once.is_hit(req) and req.kvrag.spec.ranked_heads:
                state.rows.read_cells(row, state.stored_layouts[req.kvrag.once.layout_key])
    return result


def _scores(state: PluginState, req) -> bool:
    if getattr(req, "kvrag", None) is None or req.beam_group is not None:
        return False
    stored = req.kvrag.once
    if stored is not None and stored.recall is not None and stored.recall.pending \
            and stored.state != "new" and req.kv.req_pool_idx in state.rows.resident:
        return True  # a build's question scoring pass, after its prefix was compressed
    if stored is not None and stored.state == "hit":
        return stored.recall is not None and stored.recall.pending
    return (req.kv.req_pool_idx not in state.rows.resident
            and not req.kvrag.spec.build().reconstruction)


def _rebuilding(req) -> Rebuild | None:
    """The reconstruction a request's coming extend runs a pass of, if any."""
    stored = once.of(req)
    rebuild = None if stored is None else stored.rebuild
    return rebuild if rebuild is not None and rebuild.current is not None else None


def process_batch_result_prefill(original, processor, batch, *args, **kwargs):
    """Compress the requests whose prefill just ended, after SGLang processed the batch's
    results and before it streams them (``stream_output``), so the first chunk a client
    receives already carries what the plugin kept (``config.REPORT_KEY``)."""
    state = current()
    if state is None:
        return original(processor, batch, *args, **kwargs)
    # SGLang counts a request's middle chunks down while processing them: read it first
    last_chunk = {id(req) for req in batch.reqs if req.inflight_middle_chunks <= 0}
    state.pending_prefill = PendingPrefill(processor, batch, last_chunk)
    try:
        result = original(processor, batch, *args, **kwargs)
    except BaseException:
        state.pending_prefill = None
        raise
    _compress_pending(state)  # a rank or a batch that streamed nothing
    return result


def stream_output(streamer, *args, **kwargs):
    state = current()
    if state is not None:
        _compress_pending(state)


def _compress_pending(state: PluginState) -> None:
    pending, state.pending_prefill = state.pending_prefill, None
    if pending is None:
        return
    allocator = pending.processor.token_to_kv_pool_allocator
    for req in pending.batch.reqs:
        if not req.kv.holds_kv:
            continue
        row, last = req.kv.req_pool_idx, id(req) in pending.last_chunk
        wanted = getattr(req, "kvrag", None)
        if wanted is None or req.beam_group is not None:
            if last:
                state.queries.drop(row)  # prefill done, nothing to score
                _report(state, req, _held(state, len(req.origin_input_ids)), write=False)
            continue
        stored = wanted.once
        if stored is not None and recall_step.pass_done(state, req):
            recall_step.recall(state, req, allocator, pending.processor.tree_cache)
            if stored.recall.report is not None:  # a build reports once it has recalled
                _report(state, req, stored.recall.report | _held(state, once.held_slots(stored))
                        | recall_step.report(stored))
            continue
        if stored is not None and stored.state == "hit":
            if last:
                prefilled = stored.question * (1 if stored.recall is None else 2)
                _report(state, req, once.report(req, stored, "hit", prefilled)
                        | _held(state, once.held_slots(stored)) | {"seconds": 0.0}
                        | ({} if stored.recall is None else recall_step.report(stored)))
            continue
        if req.finished() or req.is_retracted or row in state.rows.resident:
            continue
        if stored is not None and stored.spec.build().reconstruction:
            if _passes_done(state, req, stored, allocator):
                _compress(state, req, allocator, pending.processor.tree_cache,
                          stored.rebuild)
            continue
        if stored is not None:
            # a building once: request is compressed where its corpus prefix ends
            prefilled = state.queries.prefilled(row)
            if prefilled < stored.end:
                continue
            if prefilled > stored.end:
                logger.error("kvrag: request %s ran past its corpus prefix (%d > %d) before "
                             "it was compressed; left uncompressed", req.rid, prefilled,
                             stored.end)
                state.queries.drop(row)
                continue
        elif not last:
            continue
        _compress(state, req, allocator, pending.processor.tree_cache)


def _passes_done(state: PluginState, req, stored: once.OnceRequest, allocator) -> bool:
    """Step a KVzip build through its reconstruction passes (``reconstruction.py``) as its
    chunks end: start them when the prefix is prefilled, rewind after each; True once the
    last is done and the prompt is the real one again."""
    committed = req.kv.kv_committed_len
    rebuild = stored.rebuild
    if rebuild is None:
        if committed != stored.end:
            return False
        rebuild = stored.rebuild = Rebuild.start(stored.spec.build(), stored.real,
                                                 req.kvrag.span, state.tokenizer)
    elif committed < rebuild.cut:
        return False
    else:
        rewind(req, rebuild, state.rows.req_to_token, allocator)
    once.set_prompt(req, rebuild.prompt(stored.real), req.extra_key)
    return rebuild.current is None


def _compress(state: PluginState, req, allocator, tree_cache,
              rebuild: Rebuild | None = None) -> None:
    wanted, row = req.kvrag, req.kv.req_pool_idx
    ends = (sentence_ends_for(wanted.spec, req.origin_input_ids, state.tokenizer)
            if wanted.spec.chunk == SENTENCE else None)
    free_before = allocator.available_size()
    done = state.rows.compress(
        row, state.queries.pop(row), rid=req.rid, protected=req.kv.cache_protected_len,
        spec=wanted.spec, span=wanted.span, sentence_ends=ends,
        make_room=lambda k: allocator.evict_to_free_tokens(tree_cache, k),
        reconstruction=(None if rebuild is None else
                        (rebuild.end, rebuild.reconstruction(len(state.rows.layer_ids)))))
    if done is None:
        return
    state.room_made = state.room_made or done.freed > done.allocated
    comp = done.compacted
    logger.info("kvrag: %s kept %d slots for %d tokens (%s), freed %d slots", req.rid,
                comp.kv_tokens, comp.n, wanted.spec.name, done.freed)
    line = {
        "rid": req.rid, "spec": wanted.spec.name, "span": list(wanted.span),
        "prompt_tokens": comp.n, "protected": comp.protected, "keep": comp.keep,
        **_held(state, comp.kv_tokens, comp.layer_mean_tokens),
        "freed": done.freed, "allocated": done.allocated, "free_before": free_before,
        "free_after": allocator.available_size(), "seconds": done.seconds,
    }
    if rebuild is not None:
        line["reconstruction"] = rebuild.report()
    if state.settings.record_kept:
        line["kept"] = [k.tolist() for k in comp.kept]
    stored = wanted.once
    if stored is not None:
        state.rows.resident[row].once = stored  # its slots go to the tree on release
        prefilled = len(stored.real) - req.kv.cache_protected_len
        line |= once.report(req, stored, "built", prefilled)
        line |= _held(state, once.held_slots(stored))
        if stored.recall is not None:  # its question's scoring pass comes next
            line["prefill_tokens"] += stored.question
            stored.recall.report = line
            once.set_prompt(req, stored.real[:stored.end] + stored.question_ids(),
                            req.extra_key)
            return
    _report(state, req, line)


def _held(state: PluginState, slots: int, layer_mean: float | None = None) -> dict:
    """What a request's prompt holds in the pool when its decode starts."""
    return {"kv_tokens": slots, "kv_bytes": slots * state.slot_bytes,
            "layer_mean_kv_tokens": float(slots if layer_mean is None else layer_mean)}


def _report(state: PluginState, req, line: dict, write: bool = True) -> None:
    """Hand ``line`` to the client with the request's response (a one-item list in
    ``meta_info[config.REPORT_KEY]``, streamed or not) and, if ``write``, to the stats
    file (by TP rank 0: every rank compresses its own heads of the same request alike)."""
    req.customized_info = (req.customized_info or {}) | {config.REPORT_KEY: [line]}
    if write and state.settings.stats_path and _tp_rank() == 0:
        stats.write(state.settings.stats_path, line)


def is_request_level_customized_info_key(result, streamer, key, *args, **kwargs):
    """The plugin's report is one value per request, not one per output token."""
    return result or key == config.REPORT_KEY


def get_new_batch_prefill(scheduler, running_batch, *args, **kwargs):
    """After a compaction freed slots, look for requests to admit again: SGLang stops
    admitting once a batch could not take a request, and only a request leaving clears
    the flag; the slots a compaction freed are room too."""
    state = current()
    if state is not None and state.room_made:
        running_batch.batch_is_full = False
        state.room_made = False


def free_kv_row(original, cache, kv, ranges):
    """Releasing a compressed request frees its compacted slots (or stores them, for a
    request that built a compress-once prefix) instead of the prompt positions they
    replaced."""
    state = current()
    resident = state.release(kv.req_pool_idx) if state is not None else None
    if resident is None:
        return original(cache, kv, ranges)
    compacted = resident.record
    rest = release_ranges(compacted, ranges)
    if rest:
        original(cache, kv, rest)
    if resident.once is not None and cache.supports_prefix_sharing():
        once.store(cache, resident.once, compacted.slots)
        if compacted.layout is not None:
            state.stored_layouts[resident.once.layout_key] = compacted.layout
        if compacted.host is not None:
            state.host_stores[resident.once.layout_key] = compacted.host
    else:
        cache.token_to_kv_pool_allocator.free(compacted.slots)
    return None


def kv_private_tokens(result, kv, *args, **kwargs):
    """SGLang's memory checker counts a compressed request's slots as it holds them."""
    state = current()
    return result if state is None else state.rows.held_slots(kv.req_pool_idx, result)


def process_batch_result_decode(processor, batch, *args, **kwargs):
    """With ``KVRAG_PLUGIN_POOL_LOG``: the pool's slots in use while ``batch`` decodes (the
    tree's cached prefixes included) and how many requests it holds."""
    state = current()
    if state is None or not state.settings.pool_log or _tp_rank() != 0:
        return
    allocator = processor.token_to_kv_pool_allocator
    line = {"used": int(allocator.size - allocator.available_size()),
            "running": len(batch.reqs)}
    stats.write(state.settings.pool_log, line)


def get_internal_state(result, scheduler, *args, **kwargs):
    """``/server_info`` says what the KV pool holds now (``kvrag_pool``): slots in use,
    the radix tree's among them (cached prefixes, stored compressed corpora), and free;
    and the bytes of the stored corpora's host stores (``+recall``)."""
    state = current()
    if state is None:
        return result
    allocator, tree = scheduler.token_to_kv_pool_allocator, scheduler.tree_cache
    free = int(allocator.available_size())
    result.internal_state["kvrag_pool"] = {
        "slots": int(allocator.size), "used": int(allocator.size) - free, "free": free,
        "tree": int(tree.evictable_size()) + int(tree.protected_size()),
        "host_kv_bytes": sum(store.nbytes for store in state.host_stores.values())}
    return result


def delete_leaf(cache, node, *args, **kwargs):
    """The classic radix tree deletes each victim here."""
    once.forget(current(), node)


def evict_device_leaf(cache, node_id, *args, **kwargs):
    """The unified radix tree evicts each device victim here. Its Rust core does not
    resolve nodes (SGLang's default policies use it; ``kvrag-cost`` the Python core), so
    under it a stored prefix's host store leaves only with a flushed tree."""
    state = current()
    if state is None or not state.host_stores and not state.stored_layouts:
        return
    try:
        node = cache.tree_core.node_by_id(node_id)
    except NotImplementedError:
        return
    once.forget(state, node)


def reset_tree(result, cache, *args, **kwargs):
    """A flushed radix tree takes every stored prefix's layout and host store with it."""
    state = current()
    if state is not None:
        state.stored_layouts.clear()
        state.host_stores.clear()


def _tp_rank() -> int:
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
