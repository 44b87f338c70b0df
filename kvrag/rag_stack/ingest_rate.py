"""The chunks an ingest has written and their rate, as its progress line shows them."""

from __future__ import annotations

import time
from collections.abc import Callable


class IngestCounter:
    """An ingest's ``on_batch(chunks, docs)``: counts both and calls ``show(docs done,
    "CHUNKS (RATE/s)")`` after each written batch."""

    def __init__(self, show: Callable[[int, str], None]) -> None:
        self.show = show
        self.chunks = 0
        self.docs = 0
        self.start = time.perf_counter()

    def __call__(self, chunks: int, docs: int) -> None:
        self.chunks += chunks
        self.docs += docs
        rate = self.chunks / max(time.perf_counter() - self.start, 1e-9)
        self.show(self.docs, f"{self.chunks:,} ({rate:,.0f}/s)")
