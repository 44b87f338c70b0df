"""The prompt queries a compressed request's method scores with, kept during its prefill.

The scheduler announces each extend batch before it runs (which rows, which of them will
be compressed); during the batch's forward the attention backend hands every layer's
queries here, and the last ``keep`` of each announced prompt are kept, across prefill
chunks, until the request is compressed (``pop``) or leaves (``drop``).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class QueryTail:
    """The last queries of one request's prompt, per layer, across chunks."""

    def __init__(self) -> None:
        self.end = 0  # prompt position after the last captured query
        self.layers: dict[int, torch.Tensor] = {}  # layer_id -> [m, q_heads, d]


class QueryCapture:
    def __init__(self, keep: int | None, layer_ids: list[int]) -> None:
        """``keep``: queries kept per request and layer (None: all, for h2o)."""
        self.keep = keep
        self.layer_ids = layer_ids
        self.tails: dict[int, QueryTail] = {}  # req_pool_idx -> its queries so far
        # the next extend batch's rows and which of them will be compressed, then this one's
        self._announced: tuple[list[int], list[bool]] | None = None
        self._extend: tuple[list[int], list[bool]] | None = None

    def announce(self, rows: list[int], compress: list[bool]) -> None:
        """The coming extend batch's rows in batch order (host values, so the forward needs
        no sync) and which of them will be compressed."""
        self._announced = (rows, compress)

    def begin(self, forward_batch) -> None:
        """A forward starts: an extend takes the announcement made for it."""
        self._extend, self._announced = self._announced, None
        if not forward_batch.forward_mode.is_extend():
            self._extend = None
        elif self._extend is not None and len(self._extend[0]) != forward_batch.batch_size:
            logger.warning("kvrag: an extend of %d requests after %d were announced; no "
                           "queries kept", forward_batch.batch_size, len(self._extend[0]))
            self._extend = None

    @property
    def extend_rows(self) -> list[int] | None:
        return self._extend[0] if self._extend else None

    def record(self, q: torch.Tensor, layer, forward_batch) -> None:
        """Keep the announced requests' last queries of this layer's extend."""
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
                tail = self.tails[row] = QueryTail()
            chunk = q[start:start + length]
            old = tail.layers.get(layer.layer_id)
            both = chunk if old is None else torch.cat([old, chunk])
            kept = both if self.keep is None else both[-self.keep:]
            tail.layers[layer.layer_id] = kept.detach().clone()
            if layer.layer_id == self.layer_ids[-1]:
                tail.end = pre + length
            start += length

    def prefilled(self, row: int) -> int:
        """Prompt positions whose queries the request in ``row`` has run so far."""
        tail = self.tails.get(row)
        return 0 if tail is None else tail.end

    def pop(self, row: int) -> QueryTail | None:
        return self.tails.pop(row, None)

    def drop(self, row: int) -> None:
        self.tails.pop(row, None)
