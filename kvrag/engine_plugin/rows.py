"""Who owns which KV slots and request rows once a request is compressed, and giving
them back.

Slot ownership, which keeps the radix cache intact (``compaction.py`` does the copy):
- positions ``[0, protected)`` were matched from the radix tree; the tree owns them, so
  they are read but never written or freed here;
- positions ``[protected, n)`` are the request's own prompt slots: the first ``kmax`` are
  reused for the compacted cache (extra slots are allocated only if there are fewer), the
  rest are freed at compaction. A compressed request is flagged
  ``skip_radix_cache_insert``, so the tree never receives its compacted slots as if they
  held the full prefix;
- positions ``[n, ...)`` are decode tokens, untouched.

Rows: the request's own ``req_to_token`` row keeps its logical layout (SGLang writes
each decode token's slot there, and releases from it); a compacted request gets a second
row from the same pool, its *physical row* (the ``kmax`` kept slots, then each decoded
token's slot), which the attention backend hands the inner backend. On release the
compacted slots are freed (or stored, for compress-once) instead of the stale
``[protected, n)`` range, and the physical row is freed.

Cells (``heads=ranked``, ``cells.py``): a packed prompt's slots are the request's (or,
for a compress-once prefix, the tree's) exactly as above, and every cell of such a slot
belongs to the same prompt, whichever head's column it is in; nothing else writes them.
``cells`` maps the row the attention backend reads (a physical row, or a compress-once
hit's own row, whose first ``kmax`` positions are the stored prefix) to the prompt's
``CellLayout``, for as long as that row is in use.

SGLang's strict memory checks (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY`` / ``_IDLE``)
count a compacted request's slots as it holds them (``held_slots``) and every row given
back, so a slot or row leaked or freed twice stops the server; the engine tests run with
them on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvrag.compression import CompressionSpec, HeadShard
from kvrag.engine_plugin.capture import QueryTail
from kvrag.engine_plugin.cells import CellLayout
from kvrag.engine_plugin.compaction import Compacted, CompactionResult, compact

logger = logging.getLogger(__name__)


@dataclass
class Resident:
    """A compacted request: its record and the physical row the inner backend reads."""

    record: Compacted
    row: int  # its second req_to_token row: kept slots, then decoded ones
    once: object = None  # once.OnceRequest of a request that built a shared prefix

    @property
    def shift(self) -> int:
        """Logical minus physical length (the prompt tokens compaction removed)."""
        return self.record.n - int(self.record.slots.numel())

    @property
    def uneven(self) -> bool:
        return len(set(self.record.keep)) > 1


class Rows:
    """The compacted requests of one process, by their ``req_to_token`` row."""

    def __init__(self, model_runner, layer_ids: list[int], shard: HeadShard) -> None:
        self.pool = model_runner.token_to_kv_pool
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.row_pool = model_runner.req_to_token_pool
        self.req_to_token = self.row_pool.req_to_token
        self.layer_ids = layer_ids
        self.shard = shard
        device = self.req_to_token.device
        n_rows = self.req_to_token.shape[0]
        # per request row: the row the inner backend reads, and logical minus physical length
        self.physical_row = torch.arange(n_rows, dtype=torch.int64, device=device)
        self.shift = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.resident: dict[int, Resident] = {}  # req_pool_idx -> compacted request
        self.by_physical: dict[int, Resident] = {}  # its physical row -> the same
        self.uneven = 0  # resident requests with per-layer budgets
        self.cells: dict[int, CellLayout] = {}  # read row -> its packed prompt's layout

    def compress(self, row: int, tail: QueryTail | None, *, rid: str, protected: int,
                 spec: CompressionSpec, span: tuple[int, int],
                 make_room: Callable[[int], object] | None = None,
                 sentence_ends: torch.Tensor | None = None,
                 reconstruction: tuple[int, list[torch.Tensor]] | None = None,
                 ) -> CompactionResult | None:
        """Compress the prompt KV of the request in ``row`` with its captured queries
        ``tail``, or, for KVzip, ``reconstruction``: (n, per layer its passes' scores of
        the first n positions); None leaves it uncompressed (and logs why)."""
        if reconstruction is not None:
            n, rebuilt = reconstruction
            queries = [scores.new_empty(0, scores.shape[0], 1) for scores in rebuilt]  # none
        elif tail is None or len(tail.layers) != len(self.layer_ids) or tail.end < span[1]:
            logger.warning("kvrag: no prefill queries for request %s; left uncompressed", rid)
            return None
        else:
            n, rebuilt = tail.end, None
            queries = [tail.layers[lid] for lid in self.layer_ids]
            needed = spec.build().queries_needed()
            have = queries[0].shape[0]
            if needed is None and have < n - protected or needed is not None and have < min(
                    needed, n - protected):
                logger.warning("kvrag: %s needs %s prompt queries, the backend kept %d; "
                               "request %s left uncompressed", spec.name, needed or "all",
                               have, rid)
                return None
        physical = self.row_pool.alloc_rows(1)
        if not physical:
            logger.warning("kvrag: no free req_to_token row for the compacted request %s; "
                           "left uncompressed", rid)
            return None
        result = compact(
            self.pool, self.allocator, self.req_to_token[row], rid=rid, n=n,
            protected=protected, layer_ids=self.layer_ids, queries=queries, spec=spec,
            span=span, make_room=make_room, shard=self.shard, sentence_ends=sentence_ends,
            reconstruction=rebuilt,
        )
        if result is None:
            self.row_pool.free_rows(physical)
            logger.warning("kvrag: no free slots for the compacted cache of request %s (its "
                           "prefix is shared); left uncompressed", rid)
            return None
        self._adopt(row, result.compacted, physical[0])
        return result

    def _adopt(self, row: int, record: Compacted, physical: int) -> None:
        resident = self.resident[row] = self.by_physical[physical] = Resident(record, physical)
        kmax = int(record.slots.numel())
        self.req_to_token[resident.row, :kmax] = record.slots.to(self.req_to_token.dtype)
        self.physical_row[row] = resident.row
        self.shift[row] = resident.shift
        self.uneven += resident.uneven
        if record.layout is not None:
            self.cells[resident.row] = record.layout

    def read_cells(self, row: int, layout: CellLayout) -> None:
        """The request in ``row`` reads a packed prompt (a compress-once hit's stored
        prefix) at its first ``layout.kmax`` positions."""
        self.cells[row] = layout

    def shift_of(self, row: int) -> int:
        resident = self.resident.get(row)
        return 0 if resident is None else resident.shift

    def held_slots(self, row: int, counted: int) -> int:
        """The slots the request in ``row`` holds, where SGLang counted ``counted``."""
        resident = self.resident.get(row)
        if resident is None:
            return counted
        comp = resident.record
        return counted - (comp.n - comp.protected) + int(comp.slots.numel())

    def release(self, row: int) -> Resident | None:
        """Forget a request leaving ``row``; what it held if it was compacted (its physical
        row is freed here; its slots are the caller's to free or store)."""
        self.cells.pop(row, None)
        resident = self.resident.pop(row, None)
        if resident is None:
            return None
        self.cells.pop(resident.row, None)
        del self.by_physical[resident.row]
        self.physical_row[row] = row
        self.shift[row] = 0
        self.uneven -= resident.uneven
        self.row_pool.free_rows([resident.row])
        return resident


def release_ranges(
    compacted: Compacted, ranges: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``ranges`` of row positions without the compacted prompt ``[protected, n)``.

    The caller frees ``compacted.slots`` instead; what is left are decode positions.
    """
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if start < compacted.protected:
            raise AssertionError(f"release of tree-owned positions {start}..{end} "
                                 f"(protected up to {compacted.protected})")
        start = max(start, compacted.n)
        if start < end:
            out.append((start, end))
    return out
