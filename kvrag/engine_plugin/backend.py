"""``--attention-backend kvrag``: an inner SGLang backend plus KV-cache compression.

The inner backend (``KVRAG_INNER_BACKEND``: torch_native on a CPU, triton on a GPU by
default) runs every forward. On top:

- prefill (``forward_extend``) also hands each layer's queries to ``capture.py``, which
  keeps the last ones of each prompt that will be compressed (SnapKV's observation
  window), and those of a KVzip reconstruction pass to ``reconstruction.py``, which
  scores them;
- after a request's last prefill chunk, a scheduler hook (``lifecycle.py``) compresses
  it into ``kmax`` slots and frees the rest (``rows.py``);
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

A batch holding a request that reads a prompt packed into cells (``heads=ranked``,
``cells.py``) attends here whole, prefill and decode, every request of it as a list of
cells per (layer, head).

Shapes follow SGLang: q [tokens, q_heads * head_dim], pool buffers [slot, kv_head, dim].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from kvrag.engine_plugin import cells
from kvrag.engine_plugin.capture import QueryCapture
from kvrag.engine_plugin.once import PositionShifts
from kvrag.engine_plugin.reconstruction import Rebuilds
from kvrag.engine_plugin.rows import Rows

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


class KvragAttnBackend(AttentionBackend):
    def __init__(self, model_runner, inner, queries: QueryCapture, rows: Rows,
                 shifts: PositionShifts, rebuilds: Rebuilds, python_decode: bool) -> None:
        """``queries``, ``rows``, ``shifts``, ``rebuilds``: the plugin state's
        (``state.py``), which the
        scheduler hooks change between forwards; ``python_decode``: every decode batch runs
        here (see the module docstring)."""
        super().__init__()
        self.inner = inner
        self.queries = queries
        self.rows = rows
        self.shifts = shifts
        self.rebuilds = rebuilds
        self.python_decode = python_decode
        self.pool = model_runner.token_to_kv_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        # plans the inner backend's reads (kv_loc_plan) over req_to_token rows
        self.translator = getattr(model_runner, "kv_index_translator", None)
        self.layer_ids = rows.layer_ids
        self._view = None  # the forward batch the inner backend sees
        self._plan: list[_DecodePlan] | None = None
        self._cells: _CellBatch | None = None

    # --- metadata: the inner backend owns it, over physical rows when needed ---
    def init_forward_metadata(self, forward_batch) -> None:
        mode = forward_batch.forward_mode
        self._plan = None
        self._cells = None
        self._view = forward_batch
        self.queries.begin(forward_batch)
        self.rebuilds.begin(forward_batch)
        self.shifts.apply(forward_batch)
        resident = self.rows.resident
        if resident and mode.is_decode():
            self._view = self._physical_decode(forward_batch)
        elif resident and mode.is_extend():
            self._view = self._physical_extend(forward_batch)
        if self.rows.cells and (mode.is_decode() or mode.is_extend()):
            self._cells = _CellBatch.of(self._view, self.req_to_token, self.rows.cells,
                                        self.layer_ids, self.pool)
            if self._cells is not None:
                return
        if mode.is_decode() and (self.python_decode or self.rows.uneven):
            self._plan = self._python_plan(self._view)
            return
        self.inner.init_forward_metadata(self._view)

    def _physical_decode(self, fb):
        rows = fb.req_pool_indices
        physical = self.rows.physical_row[rows]
        lengths = fb.seq_lens - self.rows.shift[rows].to(fb.seq_lens.dtype)
        # the new token's slot (SGLang wrote it to the logical row) at its physical place;
        # an uncompressed row's is where it was
        self.req_to_token[physical, lengths - 1] = self.req_to_token[rows, fb.seq_lens - 1]
        return self._view_of(fb, physical, lengths, fb.seq_lens_sum)

    def _physical_extend(self, fb):
        """An extend over compacted requests (a once: request building its corpus prefix
        extends its question after compaction) reads their kept slots, then its own new
        tokens' slots."""
        rows = self.queries.extend_rows or fb.req_pool_indices.tolist()
        resident = self.rows.resident
        if not any(row in resident for row in rows):
            return fb
        # a compacted row is read from its physical row even with no shift (ratio 0):
        # its own slots were reused for the kept tokens in kept order
        shifts = [self.rows.shift_of(row) for row in rows]
        prefix = list(fb.extend_prefix_lens_cpu)
        lengths = [p + e for p, e in zip(prefix, fb.extend_seq_lens_cpu, strict=True)]
        for row, s, start, end in zip(rows, shifts, prefix, lengths, strict=True):
            if row in resident:
                self.req_to_token[resident[row].row, start - s:end - s] = (
                    self.req_to_token[row, start:end])
        device = fb.seq_lens.device
        shift = torch.tensor(shifts, dtype=fb.seq_lens.dtype, device=device)
        view = self._view_of(fb, self.rows.physical_row[fb.req_pool_indices], fb.seq_lens - shift,
                             sum(lengths) - sum(shifts))
        view.extend_prefix_lens = fb.extend_prefix_lens - shift.to(fb.extend_prefix_lens.dtype)
        view.extend_prefix_lens_cpu = [p - s for p, s in zip(prefix, shifts, strict=True)]
        return view

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
            resident = self.rows.by_physical.get(row)
            keep = resident.record.keep if resident is not None and resident.uneven else None
            plans.append(_DecodePlan.of(self.req_to_token[row], length, keep))
        return plans

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        return self.inner.init_cuda_graph_state(max_bs, max_num_tokens)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    def support_triton(self):
        return self.inner.support_triton()

    # --- prefill: the prompt's queries are kept for compression ---
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.queries.record(q, layer, forward_batch)
        if self._cells is not None:
            out = self._cells.forward(q, k, v, layer, forward_batch, save_kv_cache, self)
        else:
            out = self.inner.forward_extend(q, k, v, layer, self._view,
                                            save_kv_cache=save_kv_cache, **kwargs)
        # a KVzip pass's queries, scored once its keys are in the pool
        self.rebuilds.score(q, layer, forward_batch, self.pool, self.req_to_token)
        return out

    # --- decode ---
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        windowed = layer.is_cross_attention or (layer.sliding_window_size or -1) > -1
        if windowed and self.rows.resident:
            raise NotImplementedError("kvrag compression serves full-attention layers only")
        if self._cells is not None and not windowed:
            return self._cells.forward(q, k, v, layer, forward_batch, save_kv_cache, self)
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


@dataclass
class _CellBatch:
    """A batch that attends here over cell lists (``cells.py``): every request's keys
    for this forward, and for a prefill, which of them each new token may see."""

    index: torch.Tensor  # [layers, batch, kv_heads, S] flat cells, padded
    valid: torch.Tensor  # [layers, batch, kv_heads, S]
    causal: list[torch.Tensor] | None  # prefill: per request, bool [new tokens, S_i]
    widths: list[int]  # per request, its S_i before padding

    @classmethod
    def of(cls, view, req_to_token, layouts, layer_ids, pool) -> _CellBatch | None:
        rows = view.req_pool_indices.tolist()
        if not any(row in layouts for row in rows):
            return None
        layers = len(layer_ids)
        kv_heads = pool.get_key_buffer(layer_ids[0]).shape[1]
        reads = [cells.CellRead.of(req_to_token[row], length, layouts.get(row), layers,
                                   kv_heads)
                 for row, length in zip(rows, view.seq_lens.tolist(), strict=True)]
        index, valid = cells.stack(reads)
        causal = None
        if view.forward_mode.is_extend():
            causal = []
            for read, new in zip(reads, view.extend_seq_lens_cpu, strict=True):
                width = read.index.shape[2]
                # new token j sees the packed cells and later tokens up to its own
                seen = torch.arange(width, device=index.device) < (
                    width - new + torch.arange(new, device=index.device))[:, None] + 1
                causal.append(seen)
        return cls(index, valid, causal, [r.index.shape[2] for r in reads])

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache, backend):
        if save_kv_cache and k is not None and v is not None:
            backend.pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None),
                                       k, v)
        local = layer.layer_id - backend.layer_ids[0]
        kbuf = backend.pool.get_key_buffer(layer.layer_id)
        vbuf = backend.pool.get_value_buffer(layer.layer_id)
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        index, valid = self.index[local], self.valid[local]  # [batch, kv_heads, S]
        if self.causal is None:  # decode: one token per request
            out = cells.attend(q[:, None], index, valid[:, None], kbuf, vbuf, layer.scaling)
            return out.reshape(q.shape[0], -1)
        outs, start = [], 0
        for i, (seen, width) in enumerate(zip(self.causal, self.widths, strict=True)):
            new = seen.shape[0]
            allowed = valid[i, None, :, :width] & seen[:, None, :]  # [new, kv_heads, S_i]
            outs.append(cells.attend(q[None, start:start + new], index[i:i + 1, :, :width],
                                     allowed[None], kbuf, vbuf, layer.scaling)[0])
            start += new
        return torch.cat(outs).reshape(q.shape[0], -1)
