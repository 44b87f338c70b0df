"""The plugin's per-process state: the one global, and everything it owns.

SGLang's scheduler hooks and the attention backend share what compression needs to know
about each request. All of it hangs off one ``PluginState``, created with the backend in
the process that runs the model (``register.create_backend``) and reached through
``current()``; in every other SGLang process there is none, and the hooks pass through.

What it owns, by request row (``req_pool_idx``):
- ``queries``: the prompt queries kept for the request's method (``capture.py``);
- ``rows``: its compacted record, physical row and length shift once compressed
  (``rows.py``);
- ``shifts``: the position shift of a compress-once hit (``once.py``);
- ``rebuilds``: the KVzip reconstruction pass a compress-once build runs
  (``reconstruction.py``);
and, by compress-once prefix (``once.stored_id``), what its hits read besides its slots:
``stored_layouts``, the cell layout of a prefix packed per head (``heads=ranked``,
``cells.py``), and ``host_stores``, the evicted entries of a prefix that recalls
(``+recall``, ``recall.py``); both leave with the prefix's tree entry (``once.forget``).
SGLang's ``Req`` carries one kvrag attribute, ``req.kvrag``: the request's spec and span
(``config.RequestCompression``), read once when the request is created.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from kvrag.compression.recall import HostStore
from kvrag.engine_plugin.capture import QueryCapture
from kvrag.engine_plugin.cells import CellLayout
from kvrag.engine_plugin.config import Settings
from kvrag.engine_plugin.once import PositionShifts
from kvrag.engine_plugin.reconstruction import Rebuilds
from kvrag.engine_plugin.rows import Rows


@dataclass
class PendingPrefill:
    """A prefill batch whose finished requests are compressed before its results stream."""

    processor: object  # SGLang's SchedulerBatchResultProcessor
    batch: object  # its ScheduleBatch
    last_chunk: set[int]  # id() of the requests whose prompt ended in this batch


@dataclass
class PluginState:
    settings: Settings
    queries: QueryCapture
    rows: Rows
    shifts: PositionShifts
    rebuilds: Rebuilds
    slot_bytes: int  # one pool slot's bytes over all layers (and tensor-parallel ranks)
    model_path: str  # the tokenizer's, for chunk=sentence
    trust_remote_code: bool = False
    stored_layouts: dict[bytes, CellLayout] = field(default_factory=dict)
    host_stores: dict[bytes, HostStore] = field(default_factory=dict)
    pending_prefill: PendingPrefill | None = None
    room_made: bool = False  # a compaction freed slots since the scheduler last admitted
    backend: object = field(default=None, repr=False)

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer, loaded for the first ``chunk=sentence`` request (the
        scheduler's own is not reachable from here, and absent under --skip-tokenizer-init)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path,
                                             trust_remote_code=self.trust_remote_code)

    def release(self, row: int):
        """Forget the request leaving ``row``; its ``rows.Resident`` if it was compacted."""
        self.queries.drop(row)
        self.shifts.release(row)
        self.rebuilds.drop(row)
        return self.rows.release(row)


_STATE: PluginState | None = None


def current() -> PluginState | None:
    """This process's plugin state, or None where no kvrag backend runs."""
    return _STATE


def install(state: PluginState | None) -> None:
    global _STATE
    _STATE = state
