"""RAG benchmark: ingest throughput and query latency, embedded Chroma vs a Chroma server.

Both backends get the same corpora (demo instances), the same embedding model and the
same questions in one process; medians are reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvrag.data.schema import Instance
from kvrag.rag_stack.chroma import chroma_server, open_client
from kvrag.rag_stack.pipeline import RagConfig, RagPipeline


@dataclass(frozen=True)
class RagBenchRow:
    backend: str
    chunks: int
    ingest_chunks_per_s: float
    query_median_ms: float
    query_p90_ms: float

    def to_json(self) -> dict:
        return asdict(self)


def _measure(pipeline: RagPipeline, instances: Sequence[Instance], budget: int,
             tokenize: Callable[[str], list], backend: str) -> RagBenchRow:
    chunks = 0
    t0 = time.perf_counter()
    for inst in instances:
        chunks += pipeline.ingest(inst.id, inst.docs, tokenize).added
    ingest_s = time.perf_counter() - t0
    count = lambda text: len(tokenize(text))  # noqa: E731
    latencies = []
    for inst in instances:
        q0 = time.perf_counter()
        pipeline.query(inst.id, inst.question, budget, count)
        latencies.append(1000 * (time.perf_counter() - q0))
    deciles = statistics.quantiles(latencies, n=10) if len(latencies) > 1 else latencies * 9
    return RagBenchRow(backend, chunks, chunks / ingest_s, statistics.median(latencies),
                       deciles[-1])


def bench_rag(instances: Sequence[Instance], tokenize: Callable[[str], list], embed,
              budget: int = 1024, chunk_tokens: int = 128) -> list[RagBenchRow]:
    """Embedded first, then a fresh server; each into an empty store."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-") as tmp:
        config = RagConfig(chunk_tokens=chunk_tokens)
        embedded = RagPipeline(open_client(index_dir=Path(tmp) / "embedded"), embed, config)
        rows.append(_measure(embedded, instances, budget, tokenize, "embedded"))
        with chroma_server(Path(tmp) / "server") as url:
            server = RagPipeline(open_client(url=url), embed, config)
            rows.append(_measure(server, instances, budget, tokenize, f"server {url}"))
    return rows
