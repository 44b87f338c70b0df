"""``--attention-backend kvrag``: an inner SGLang backend plus KV-cache compression.

The inner backend (``KVRAG_INNER_BACKEND``: torch_native on a CPU, triton on a GPU by
default) runs every forward. On top:

- prefill (``forward_extend``) also keeps, per layer, the last queries of each prompt that
  will be compressed (the scheduler hook in ``register.py`` names them before the batch
  runs), which the scoring methods read (SnapKV's observation window);
- after a request's last prefill chunk, the scheduler hook calls ``compress`` (see
  ``compaction.py``), which shrinks its cache into ``kmax`` slots and frees the rest;
- a compacted request is then shown to the inner backend as an ordinary request whose
  length is its kept count plus its decoded tokens. It gets a second row in SGLang's own
  ``req_to_token`` (its *physical row*: the kept slots, then each decoded token's slot, as
  it is written); batches holding one hand the inner backend a copy of the forward batch
  whose ``req_pool_indices`` and ``seq_lens`` name physical rows and lengths. Positions
  (RoPE) are the logical ones SGLang computed before attention, so nothing else changes.

The per-step work is three batched tensor ops (look up rows and shifts, write the new
slot) and no host sync; a batch while no request is compacted is passed through as it is.
Two cases decode in this module instead (``_DecodePlan``, per request in Python):

- PyramidKV gives each layer its own budget, and the inner backend's metadata is one
  length per request for all layers; while such a request is compacted, decode batches
  run here, each layer reading only its kept count;
- over torch_native on a CPU (``KVRAG_DECODE_PATH=python``, the default there), where
  reading a request's keys as views of its runs of consecutive slots beats torch_native's
  per-request gather (``kvrag bench serving`` measures both).

Shapes follow SGLang: q [tokens, q_heads * head_dim], pool buffers [slot, kv_head, dim].
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sglang.srt.arg_groups.model_override_base import resolved_view
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from kvrag.compression import CompressionSpec, HeadShard
from kvrag.engine_plugin.compaction import Compacted, CompactionResult, compact

logger = logging.getLogger(__name__)

# The backend of this process: the scheduler hooks run in the process that owns it.
ACTIVE: KvragAttnBackend | None = None


MAX_RUNS = 16  # slot runs read as views; a more fragmented request is gathered instead


def _runs(slots: torch.Tensor) -> list[tuple[int, int]] | None:
    """(first slot, length) of each run of consecutive slots; None past MAX_RUNS."""
    if slots.numel() == 0:
        return []
    breaks = (torch.nonzero(slots[1:] - slots[:-1] != 1).flatten() + 1).tolist()
    if len(breaks) >= MAX_RUNS:
        return None
    bounds = [0, *breaks, slots.numel()]
    return [(int(slots[a]), b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _truncate(runs: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    out = []
    for start, length in runs:
        if count <= 0:
            break
        out.append((start, min(length, count)))
        count -= length
    return out


@dataclass
class _DecodePlan:
    """Where one request's keys are this decode step, read from its physical row: the
    prompt part (``kmax`` kept slots of which ``keep[layer]`` are valid, or the whole
    prompt), then its decoded tokens, each as slot runs when they are few, else as lists."""

    prompt: torch.Tensor
    decoded: torch.Tensor
    prompt_runs: list[tuple[int, int]] | None
    decoded_runs: list[tuple[int, int]] | None
    keep: list[int] | None  # per layer, for a request with per-layer budgets

    @classmethod
    def of(cls, row: torch.Tensor, length: int, keep: list[int] | None = None,
           ) -> _DecodePlan:
        """``row``: a physical row, valid up to ``length``; ``keep``: per-layer budgets."""
        split = length if keep is None else max(keep)
        prompt, decoded = row[:split], row[split:length]
        return cls(prompt, decoded, _runs(prompt), _runs(decoded), keep)

    def pieces(self, layer: int) -> list[slice | torch.Tensor]:
        count = self.prompt.numel() if self.keep is None else self.keep[layer]
        if self.prompt_runs is not None and self.decoded_runs is not None:
            return [slice(s, s + n) for s, n in
                    _truncate(self.prompt_runs, count) + self.decoded_runs]
        return [torch.cat([self.prompt[:count], self.decoded])]


def _attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
            scale: float) -> torch.Tensor:
    """One decoded token's attention over key/value pieces, GQA without copying them.

    q: [q_heads, d]; keys/values: [len_i, kv_heads, d] each. Returns [q_heads, d].
    """
    kv_heads, d = keys[0].shape[1], q.shape[-1]
    qg = q.view(kv_heads, -1, d)  # [kv_heads, group, d]
    scores = torch.cat([torch.matmul(qg, k.to(q.dtype).permute(1, 2, 0)) for k in keys], -1)
    weights = (scores * scale).softmax(-1)  # [kv_heads, group, total]
    out = torch.zeros_like(qg)
    start = 0
    for v in values:
        out += torch.matmul(weights[..., start:start + v.shape[0]], v.to(q.dtype).transpose(0, 1))
        start += v.shape[0]
    return out.reshape(q.shape[0], -1)


class _QueryTail:
    """The last ``keep`` queries of one request's prompt, per layer, across chunks."""

    def __init__(self) -> None:
        self.end = 0  # prompt position after the last captured query
        self.layers: dict[int, torch.Tensor] = {}  # layer_id -> [m, q_heads, d]


@dataclass
class _Resident:
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


class KvragAttnBackend(AttentionBackend):
    def __init__(self, model_runner, inner, capture: int | None, python_decode: bool,
                 shard: HeadShard | None = None, tp_size: int = 1) -> None:
        """``capture``: prompt queries kept per request and layer (None: all, for h2o);
        ``python_decode``: every decode batch runs here (see the module docstring);
        ``shard``: this rank's KV heads under tensor parallelism, over ``tp_size`` ranks."""
        super().__init__()
        self.inner = inner
        self.capture = capture
        self.python_decode = python_decode
        self.shard = shard or HeadShard()
        self.rows = model_runner.req_to_token_pool
        self.req_to_token = self.rows.req_to_token
        self.pool = model_runner.token_to_kv_pool
        # plans the inner backend's reads (kv_loc_plan) over req_to_token rows
        self.translator = getattr(model_runner, "kv_index_translator", None)
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.server_args = model_runner.server_args
        self.layer_ids = list(range(self.pool.start_layer,
                                    self.pool.start_layer + self.pool.layer_num))
        # bytes one slot holds over all layers, read off the pool's buffers, on every rank
        self.slot_bytes = tp_size * sum(
            int(buf[0].nbytes) for lid in self.layer_ids
            for buf in (self.pool.get_key_buffer(lid), self.pool.get_value_buffer(lid)))
        device = self.req_to_token.device
        n_rows = self.req_to_token.shape[0]
        # per request row: the row the inner backend reads, and logical minus physical length
        self.physical_row = torch.arange(n_rows, dtype=torch.int64, device=device)
        self.shift = torch.zeros(n_rows, dtype=torch.int64, device=device)
        # per request row: added to its positions (a once: hit runs over fewer slots than
        # its logical prefix); rows with a shift, host side
        self.position_shift = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.shifted: set[int] = set()
        self.tails: dict[int, _QueryTail] = {}  # req_pool_idx -> captured queries
        self.resident: dict[int, _Resident] = {}  # req_pool_idx -> compacted request
        self._by_physical: dict[int, _Resident] = {}  # its physical row -> the same
        self._uneven = 0  # resident requests with per-layer budgets
        self.room_made = False  # a compaction freed slots since the scheduler last admitted
        # (result processor, batch, ids of requests in their last chunk) of a prefill batch
        # whose requests are compressed before its results stream (register.py)
        self.pending_prefill: tuple | None = None
        # the next extend batch's rows and which of them will be compressed, from the
        # scheduler; then this extend's
        self._announced: tuple[list[int], list[bool]] | None = None
        self._extend: tuple[list[int], list[bool]] | None = None
        self._view = None  # the forward batch the inner backend sees
        self._plan: list[_DecodePlan] | None = None

    # --- metadata: the inner backend owns it, over physical rows when needed ---
    def init_forward_metadata(self, forward_batch) -> None:
        mode = forward_batch.forward_mode
        self._plan = None
        self._view = forward_batch
        self._extend, self._announced = self._announced, None
        if not mode.is_extend():
            self._extend = None
        elif self._extend is not None and len(self._extend[0]) != forward_batch.batch_size:
            logger.warning("kvrag: an extend of %d requests after %d were announced; no "
                           "queries kept", forward_batch.batch_size, len(self._extend[0]))
            self._extend = None
        if self.shifted and (mode.is_decode() or mode.is_extend()):
            self._shift_positions(forward_batch)
        if self.resident and mode.is_decode():
            self._view = self._physical_decode(forward_batch)
        elif self.resident and mode.is_extend():
            self._view = self._physical_extend(forward_batch)
        if mode.is_decode() and (self.python_decode or self._uneven):
            self._plan = self._python_plan(self._view)
            return
        self.inner.init_forward_metadata(self._view)

    def _shift_positions(self, fb) -> None:
        """Logical positions for once: hits (the model applies RoPE after this)."""
        shift = self.position_shift[fb.req_pool_indices].to(fb.positions.dtype)
        if fb.forward_mode.is_extend():
            shift = torch.repeat_interleave(shift, fb.extend_seq_lens,
                                            output_size=fb.positions.shape[0])
        fb.positions += shift

    def _physical_decode(self, fb):
        rows = fb.req_pool_indices
        physical = self.physical_row[rows]
        lengths = fb.seq_lens - self.shift[rows].to(fb.seq_lens.dtype)
        # the new token's slot (SGLang wrote it to the logical row) at its physical place;
        # an uncompressed row's is where it was
        self.req_to_token[physical, lengths - 1] = self.req_to_token[rows, fb.seq_lens - 1]
        return self._view_of(fb, physical, lengths, fb.seq_lens_sum)

    def _physical_extend(self, fb):
        """An extend over compacted requests (a once: request building its corpus prefix
        extends its question after compaction) reads their kept slots, then its own new
        tokens' slots."""
        rows = self._extend[0] if self._extend else fb.req_pool_indices.tolist()
        if not any(row in self.resident for row in rows):
            return fb
        # a compacted row is read from its physical row even with no shift (ratio 0):
        # its own slots were reused for the kept tokens in kept order
        shifts = [self._shift_of(row) for row in rows]
        prefix = list(fb.extend_prefix_lens_cpu)
        lengths = [p + e for p, e in zip(prefix, fb.extend_seq_lens_cpu, strict=True)]
        for row, s, start, end in zip(rows, shifts, prefix, lengths, strict=True):
            if row in self.resident:
                self.req_to_token[self.resident[row].row, start - s:end - s] = (
                    self.req_to_token[row, start:end])
        device = fb.seq_lens.device
        shift = torch.tensor(shifts, dtype=fb.seq_lens.dtype, device=device)
        view = self._view_of(fb, self.physical_row[fb.req_pool_indices], fb.seq_lens - shift,
                             sum(lengths) - sum(shifts))
        view.extend_prefix_lens = fb.extend_prefix_lens - shift.to(fb.extend_prefix_lens.dtype)
        view.extend_prefix_lens_cpu = [p - s for p, s in zip(prefix, shifts, strict=True)]
        return view

    def _shift_of(self, row: int) -> int:
        resident = self.resident.get(row)
        return 0 if resident is None else resident.shift

    def _view_of(self, fb, rows: torch.Tensor, lengths: torch.Tensor, lengths_sum: int):
        """A shallow copy of ``fb`` over physical rows; the model keeps the original."""
        view = copy.copy(fb)
        view.req_pool_indices, view.seq_lens = rows, lengths
        # host lengths would need a sync on an accelerator; triton reads none (and only an
        # upper bound of the sum), torch_native none; create_backend admits only those two
        view.seq_lens_cpu = lengths if lengths.device.type == "cpu" else None
        view.seq_lens_sum = lengths_sum
        plan = getattr(fb, "kv_loc_plan", None)
        if plan is not None:
            view.kv_loc_plan = plan.reads_from(self.translator, seq_lens=lengths,
                                               seq_lens_cpu=view.seq_lens_cpu,
                                               read_extent=plan.read_extent)
            view.kv_loc_plan.req_pool_indices = rows
        return view

    def _python_plan(self, view) -> list[_DecodePlan]:
        plans = []
        for row, length in zip(view.req_pool_indices.tolist(), view.seq_lens.tolist(),
                               strict=True):
            resident = self._by_physical.get(row)
            keep = resident.record.keep if resident is not None and resident.uneven else None
            plans.append(_DecodePlan.of(self.req_to_token[row], length, keep))
        return plans

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        return self.inner.init_cuda_graph_state(max_bs, max_num_tokens)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    def support_triton(self):
        return self.inner.support_triton()

    # --- prefill: capture the prompt's last queries ---
    def expect_extend(self, rows: list[int], compress: list[bool],
                      shifts: list[int] | None = None) -> None:
        """Called by the scheduler hook before an extend batch: its requests' rows in
        batch order (host values, so the extend needs no sync), which of them will be
        compressed (their queries are kept), and each one's position shift (once.py)."""
        self._announced = (rows, compress)
        for row, shift in zip(rows, shifts or [], strict=False):
            if shift and row not in self.shifted:
                self.position_shift[row] = shift
                self.shifted.add(row)

    def prefilled(self, row: int) -> int:
        """Prompt positions whose queries the request in ``row`` has run so far."""
        tail = self.tails.get(row)
        return 0 if tail is None else tail.end

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._capture(q, layer, forward_batch)
        return self.inner.forward_extend(q, k, v, layer, self._view,
                                         save_kv_cache=save_kv_cache, **kwargs)

    def _capture(self, q: torch.Tensor, layer, forward_batch) -> None:
        if (self._extend is None or not any(self._extend[1]) or layer.is_cross_attention
                or forward_batch.extend_prefix_lens_cpu is None):
            return
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        prefix = forward_batch.extend_prefix_lens_cpu
        lengths = forward_batch.extend_seq_lens_cpu
        start = 0
        for row, wanted, pre, length in zip(*self._extend, prefix, lengths, strict=True):
            if not wanted:
                start += length
                continue
            tail = self.tails.get(row)
            if tail is None or (layer.layer_id == self.layer_ids[0] and tail.end != pre):
                # a new request in this row (or a row left by an aborted one)
                tail = self.tails[row] = _QueryTail()
            chunk = q[start:start + length]
            old = tail.layers.get(layer.layer_id)
            both = chunk if old is None else torch.cat([old, chunk])
            keep = both if self.capture is None else both[-self.capture:]
            tail.layers[layer.layer_id] = keep.detach().clone()
            if layer.layer_id == self.layer_ids[-1]:
                tail.end = pre + length
            start += length

    # --- decode ---
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        windowed = layer.is_cross_attention or (layer.sliding_window_size or -1) > -1
        if windowed and self.resident:
            raise NotImplementedError("kvrag compression serves full-attention layers only")
        if self._plan is None or windowed:
            return self.inner.forward_decode(q, k, v, layer, self._view,
                                             save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = q.new_empty((q.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        kbuf = self.pool.get_key_buffer(layer.layer_id)
        vbuf = self.pool.get_value_buffer(layer.layer_id)
        local = layer.layer_id - self.layer_ids[0]
        for i, plan in enumerate(self._plan):
            pieces = plan.pieces(local)
            keys = [kbuf[p] for p in pieces]  # [len, kv_heads, d]: views for slot runs
            values = [vbuf[p] for p in pieces]
            out[i] = _attend(q[i], keys, values, layer.scaling)
        return out.view(q.shape[0], -1)

    # --- called by the scheduler hook after a request's last prefill chunk ---
    def compress(self, row: int, *, rid: str, protected: int, spec: CompressionSpec,
                 span: tuple[int, int], make_room: Callable[[int], object] | None = None,
                 sentence_ends: torch.Tensor | None = None) -> CompactionResult | None:
        """Compress the prompt KV of the request in ``row``; None leaves it uncompressed."""
        tail = self.tails.pop(row, None)
        if tail is None or len(tail.layers) != len(self.layer_ids) or tail.end < span[1]:
            logger.warning("kvrag: no prefill queries for request %s; left uncompressed", rid)
            return None
        n = tail.end
        needed = spec.build().queries_needed()
        have = tail.layers[self.layer_ids[0]].shape[0]
        if needed is None and have < n - protected or needed is not None and have < min(
                needed, n - protected):
            logger.warning("kvrag: %s needs %s prompt queries, the backend kept %d; request "
                           "%s left uncompressed", spec.name, needed or "all", have, rid)
            return None
        physical = self.rows.alloc_rows(1)
        if not physical:
            logger.warning("kvrag: no free req_to_token row for the compacted request %s; "
                           "left uncompressed", rid)
            return None
        result = compact(
            self.pool, self.allocator, self.req_to_token[row], rid=rid, n=n,
            protected=protected, layer_ids=self.layer_ids,
            queries=[tail.layers[lid] for lid in self.layer_ids], spec=spec, span=span,
            make_room=make_room, shard=self.shard, sentence_ends=sentence_ends,
        )
        if result is None:
            self.rows.free_rows(physical)
            logger.warning("kvrag: no free slots for the compacted cache of request %s (its "
                           "prefix is shared); left uncompressed", rid)
            return None
        record = result.compacted
        resident = self.resident[row] = self._by_physical[physical[0]] = _Resident(
            record, physical[0])
        kmax = int(record.slots.numel())
        self.req_to_token[resident.row, :kmax] = record.slots.to(self.req_to_token.dtype)
        self.physical_row[row] = resident.row
        self.shift[row] = resident.shift
        self._uneven += resident.uneven
        return result

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer, loaded for the first ``chunk=sentence`` request (the
        scheduler's own is not reachable from here, and absent under --skip-tokenizer-init)."""
        from transformers import AutoTokenizer

        args = resolved_view(self.server_args)
        return AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path,
                                             trust_remote_code=args.trust_remote_code)

    def release(self, row: int) -> _Resident | None:
        """Forget a request leaving ``row``; what it held if it was compacted."""
        self.tails.pop(row, None)
        if row in self.shifted:
            self.shifted.discard(row)
            self.position_shift[row] = 0
        resident = self.resident.pop(row, None)
        if resident is None:
            return None
        del self._by_physical[resident.row]
        self.physical_row[row] = row
        self.shift[row] = 0
        self._uneven -= resident.uneven
        self.rows.free_rows([resident.row])
        return resident
