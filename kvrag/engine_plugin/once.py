"""Compress once, answer many: a compressed corpus prefix kept in SGLang's radix tree.

A request with a ``once:`` spec names its corpus prefix (``[0, end)``, where its
``kvrag_span`` ends). The prefix's compressed cache, ``kmax`` slots (the kept tokens of
every layer and KV head, laid out as ``compaction.py`` describes), is stored as an
ordinary radix-tree entry under a key of its own: ``kmax`` synthetic token ids derived
from a hash of the prefix ids and the spec, in a tree namespace (``extra_key``) that no
plain request uses. So the tree owns, locks and evicts it like any other prefix, with
its real size (the kept slots), and SGLang's memory checks count it.

- **Hit.** Before the request is matched against the tree, its prompt is rewritten to
  the key followed by its question tokens. When the tree holds the whole key, the
  request prefills only its question, over the kept slots, and its positions are shifted
  by ``end - kmax`` (``PositionShifts``, added before the model runs), so RoPE sees the
  logical positions. Nothing else about it differs from a plain request.
- **Miss.** The prompt is put back. The request prefills its prefix alone (its chunk is
  cut at ``end``), is compacted there with the prefix's last queries (question-agnostic
  scoring; KVzip first runs its reconstruction passes, ``reconstruction.py``), and then
  extends its question over the compacted cache. When it leaves, its kept slots go to the
  tree under the key instead of back to the allocator.

With ``+recall`` (``recall.py``) the evicted entries go to a host store kept beside the
tree entry, and every question, the building one included, runs its question twice: a
scoring pass (a middle chunk, cut where the question ends), after which it recalls, and
the question again over the kept prefix and what it recalled.

A ``full`` request over the same corpus matches the real prefix in the tree as before.
A prefix packed per head (``heads=ranked``) is stored with its cell layout, which its
hits read (``cells.py``); a hit whose layout is unknown here runs as a miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from array import array
from dataclasses import dataclass

import torch

from kvrag.compression import CompressionSpec

logger = logging.getLogger(__name__)

NAMESPACE = "kvrag-once"
_HASH_TOKENS = 4  # 124 hash bits lead the key; 31 each keeps ids in int32


def kept_prefix(spec: CompressionSpec, span: tuple[int, int]) -> int:
    """Slots a compressed prefix ``[0, span[1])`` holds: everything before the span and the
    document tokens the spec keeps (one count for all layers: ``capabilities.check``)."""
    start, end = span
    return start + spec.kept(end - start)


def key_tokens(prefix: array | list[int], spec: CompressionSpec, kmax: int) -> array:
    """The tree key of a compressed prefix: a hash of its ids and spec, the prefix's
    length (what recomputing it costs, which ``kvrag-cost`` reads), then a count."""
    digest = hashlib.sha256(array("q", prefix).tobytes() + spec.name.encode()).digest()
    head = [int.from_bytes(digest[4 * i:4 * i + 4], "little") & 0x7FFFFFFF
            for i in range(_HASH_TOKENS)]
    return array("q", (head + [len(prefix)] + list(range(kmax)))[:kmax])


def stored_prefix_length(key) -> int | None:
    """The logical length of the compressed prefix a tree node's ``RadixKey`` stores, or
    None for an ordinary node (its ``extra_key`` is not a compress-once namespace)."""
    extra = getattr(key, "extra_key", None)
    if not (isinstance(extra, str) and extra.startswith(NAMESPACE + ":")) \
            or len(key) <= _HASH_TOKENS:
        return None
    return int(key.token_ids[_HASH_TOKENS])


def namespace(spec: CompressionSpec, extra_key: str | None) -> str:
    return f"{NAMESPACE}:{spec.name}:{extra_key or ''}"


@dataclass
class OnceRequest:
    """One ``once:`` request's two prompts and which it runs with."""

    spec: CompressionSpec
    end: int  # the corpus prefix is [0, end)
    kmax: int
    real: array  # the prompt as sent
    key: array  # the compressed prefix's tree key
    extra_key: str | None  # the request's own tree namespace
    cache_salt: str | None
    state: str = "new"  # "hit": over the stored prefix; "miss": builds it
    rebuild: object = None  # reconstruction.Rebuild of a KVzip build, once its passes start
    # the process's (stored_layouts, host_stores) (PluginState), which hits read
    stored: tuple[dict, dict] | None = None
    recall: RecallRun | None = None  # +recall: this question's recall

    @classmethod
    def of(cls, spec: CompressionSpec, span: tuple[int, int], prompt, extra_key, cache_salt):
        kmax = kept_prefix(spec, span)
        real = array("q", prompt)
        return cls(spec, span[1], kmax, real, key_tokens(real[:span[1]], spec, kmax),
                   extra_key, cache_salt, recall=None if spec.recall is None else RecallRun())

    @property
    def question(self) -> int:
        return len(self.real) - self.end

    @property
    def question_start(self) -> int:
        """Where the question starts in the request's (logical) row."""
        return self.kmax if self.state == "hit" else self.end

    @property
    def shift(self) -> int:
        """Logical minus SGLang's position of the request's tokens: a hit runs over
        ``kmax`` slots where its logical prefix is ``end`` tokens long; a recalled span sits
        in its row before its question although its positions are the corpus's."""
        recalled = 0 if self.recall is None else self.recall.tokens
        return (self.end - self.kmax if self.state == "hit" else 0) - recalled

    def hit_prompt(self) -> array:
        return self.key + self.question_ids()

    def question_ids(self) -> array:
        """The question as the request runs it next: twice while its recall's scoring pass
        is still to run (the pass is a middle chunk, cut where the first copy ends)."""
        question = self.real[self.end:]
        return question + question if self.recall is not None and self.recall.pending \
            else question

    def cut(self, prefix_len: int) -> int | None:
        """Where the request's prefill chunk starting at ``prefix_len`` must end: for a
        build, at the prefix end, then after each reconstruction pass; then, with recall,
        after the question's scoring pass."""
        if self.state == "miss":
            if prefix_len < self.end:
                return self.end
            if self.rebuild is not None and self.rebuild.cut is not None:
                return self.rebuild.cut
        if self.recall is not None and self.recall.pending:
            return self.question_start + self.question
        return None

    @property
    def layout_key(self) -> bytes:
        """Where its prefix's cell layout and host store are kept
        (``PluginState.stored_layouts``, ``host_stores``): its key's hash and length."""
        return stored_id(self.key)


def stored_id(token_ids) -> bytes:
    """The id of a stored compressed prefix, from the start of its tree key."""
    return array("q", token_ids[:_HASH_TOKENS + 1]).tobytes()


@dataclass
class RecallRun:
    """One ``+recall`` question's recall: pending until its scoring pass has run."""

    pending: bool = True
    tokens: int = 0  # entries recalled per layer
    seconds: float = 0.0
    host_bytes: int = 0  # the host store it read
    positions: list[list[int]] | None = None  # per layer, the prompt positions recalled
    report: dict | None = None  # a build's report, sent once its recall is done


def of(req) -> OnceRequest | None:
    """The ``once:`` state of an SGLang request, or None."""
    wanted = getattr(req, "kvrag", None)
    return None if wanted is None else wanted.once


def is_hit(req) -> bool:
    once = of(req)
    return once is not None and once.state == "hit"


class PositionShifts:
    """Per request row, what a hit adds to its positions: it runs over ``kmax`` slots
    where its logical prefix is ``end`` tokens long. Applied to every forward batch's
    positions before the model runs (RoPE), so nothing else sees the difference."""

    def __init__(self, n_rows: int, device) -> None:
        self.by_row = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.rows: dict[int, int] = {}  # rows with a shift, and it, host side

    def announce(self, rows: list[int], shifts: list[int]) -> None:
        for row, shift in zip(rows, shifts, strict=True):
            if self.rows.get(row, 0) != shift:  # a recall changes a row's shift
                self.by_row[row] = shift
                if shift:
                    self.rows[row] = shift
                else:
                    del self.rows[row]

    def apply(self, forward_batch) -> None:
        mode = forward_batch.forward_mode
        if not self.rows or not (mode.is_decode() or mode.is_extend()):
            return
        shift = self.by_row[forward_batch.req_pool_indices].to(forward_batch.positions.dtype)
        if mode.is_extend():
            shift = torch.repeat_interleave(shift, forward_batch.extend_seq_lens,
                                            output_size=forward_batch.positions.shape[0])
        forward_batch.positions += shift

    def release(self, row: int) -> None:
        if self.rows.pop(row, None) is not None:
            self.by_row[row] = 0


# --- the scheduler's events a once: request changes (hooks, see register.py) ---

def init_next_round_input(original, req, tree_cache=None, *args, **kwargs):
    """A fresh ``once:`` request tries its stored compressed prefix first: its prompt is
    the prefix's key and its question (a hit), or, if the tree lacks the key, its real
    prompt (a miss, which builds the prefix)."""
    once = of(req)
    if once is None or tree_cache is None or req.kv.holds_kv:
        return original(req, tree_cache, *args, **kwargs)
    once.rebuild = None  # a retracted build starts over
    if once.recall is not None:
        once.recall = RecallRun()
    once.state = "hit"
    set_prompt(req, once.hit_prompt(), namespace(once.spec, once.extra_key))
    result = original(req, tree_cache, *args, **kwargs)
    if req.prefix_len >= once.kmax and _layout_known(once):
        return result
    once.state = "miss"
    set_prompt(req, array("q", once.real), once.extra_key)
    return original(req, tree_cache, *args, **kwargs)


def _layout_known(once: OnceRequest) -> bool:
    """Whether this process holds what a hit reads besides the slots: the cell layout of a
    prefix packed per head, the host store of a prefix that recalls."""
    if once.stored is None:
        return not once.spec.ranked_heads and once.spec.recall is None
    layouts, hosts = once.stored
    return ((not once.spec.ranked_heads or once.layout_key in layouts)
            and (once.spec.recall is None or once.layout_key in hosts))


def set_prompt(req, prompt, extra_key) -> None:
    req.origin_input_ids = prompt
    req.extra_key = extra_key
    req.full_untruncated_fill_ids = array("q")  # rebuilt from the prompt when next read


def select_prefill_admission(result, adder, req, *args, **kwargs):
    """End a building request's prefill chunk where its corpus prefix ends, so the prefix
    is compressed before the question runs (and a recalling question's where its scoring
    pass ends). SGLang continues one chunked request at a time (``new_chunked_req``), so
    a request to be cut waits for the next batch when another one already was."""
    once = of(req)
    if once is None or once.state == "new" or not dataclasses.is_dataclass(result):
        return result
    cut = once.cut(result.prefix_len)
    if cut is not None and result.prefix_len < cut < result.prefix_len + result.extend_len:
        result = dataclasses.replace(result, extend_len=cut - result.prefix_len,
                                     is_chunked=True, max_new_tokens=0)
    other = getattr(adder, "new_chunked_req", None)
    if result.is_chunked and other is not None and other is not req:
        from sglang.srt.managers.schedule_policy import AddReqResult

        return AddReqResult.OTHER
    return result


def add_chunked_req(adder, req, *args, **kwargs):
    once = of(req)
    cut = None if once is None or once.state == "new" else once.cut(req.prefix_len)
    if cut is not None and req.prefix_len < cut:
        limit = cut - req.prefix_len
        adder.chunked_req_limit = min(adder.chunked_req_limit or limit, limit)


def store(cache, once: OnceRequest, slots: torch.Tensor) -> None:
    """Give a built compressed corpus prefix to the tree, under its key, when the request
    that built it leaves (instead of freeing its kept slots)."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(once.key, namespace(once.spec, once.extra_key), cache_salt=once.cache_salt)
    result = cache.insert(InsertParams(key=key, value=slots.to(torch.int64)))
    if result.prefix_len:  # another request stored the same prefix first
        cache.token_to_kv_pool_allocator.free(slots[:result.prefix_len])
    logger.info("kvrag: stored the %s corpus prefix (%d slots for %d tokens)%s",
                once.spec.name, once.kmax, once.end,
                "; it was there already" if result.prefix_len else "")


def report(req, once: OnceRequest, kind: str, prefilled: int) -> dict:
    """What a once: request reports beside its held slots: built or hit, the shared
    compressed corpus's slots, the prompt tokens it computed."""
    return {"rid": req.rid, "spec": once.spec.name, "once": kind,
            "prompt_tokens": len(once.real), "shared_kv_tokens": float(once.kmax),
            "prefill_tokens": prefilled}


def held_slots(once: OnceRequest) -> int:
    """Slots a once: request's prompt holds: the kept corpus, what it recalled, then its
    question."""
    return once.kmax + (0 if once.recall is None else once.recall.tokens) + once.question


def position_shift(req) -> int:
    """What ``PositionShifts`` adds to the positions of ``req``'s coming forward."""
    stored = of(req)
    return 0 if stored is None or stored.state == "new" else stored.shift


def forget(state, node) -> None:
    """A tree node leaving the tree: if it is a stored compressed prefix, its cell layout
    and host store leave ``state`` (the plugin's) with it."""
    # a stored prefix is a child of the root (whose parent is None)
    parent = getattr(node, "parent", None)
    if state is None or parent is None or parent.parent is not None \
            or stored_prefix_length(node.key) is None:
        return
    key = stored_id(node.key.token_ids)
    state.stored_layouts.pop(key, None)
    state.host_stores.pop(key, None)
