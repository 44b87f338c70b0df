"""RAG benchmark: ingest throughput and per-question retrieval latency as a corpus grows.

One collection per store grows through the sizes asked for (1,000, then 10,000 chunks...):
each step ingests the chunks it adds (embedding included, timed) and then times every
question's retrieval to the budget (question embedding, the store's top-k, the budget
fill and its exact count), after one untimed warm-up question. The corpus is generated:
the demo's documents (or the user's), varied so that no two passages are the same (the
sentences rotated, the title numbered). The embedded store and a ``chroma run`` server get
the same chunks and questions; ratios are against the smallest size of the same store.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import TextNode

from kvrag.data.scale import varied_docs
from kvrag.data.schema import Doc
from kvrag.rag_stack.chroma import chroma_server, open_client
from kvrag.rag_stack.ingest import iter_chunks
from kvrag.rag_stack.pipeline import RagConfig, RagPipeline

STORES = ("embedded", "server")


@dataclass(frozen=True)
class RagBenchRow:
    store: str
    chunks: int
    ingest_chunks_per_s: float  # of the chunks this size added
    retrieval_median_ms: float
    retrieval_p95_ms: float
    questions: int
    retriever: str

    def to_json(self) -> dict:
        return asdict(self)


def _take(chunks: Iterator[list[TextNode]], n: int) -> Iterator[list[TextNode]]:
    """The next ``n`` chunks of the stream, a list per doc (the last one cut short)."""
    while n > 0:
        nodes = next(chunks)[:n]
        n -= len(nodes)
        yield nodes


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def _measure_store(pipeline: RagPipeline, store: str, docs: Iterator[Doc],
                   questions: Sequence[str], sizes: Sequence[int],
                   tokenize: Callable[[str], list], budget: int, retriever: str,
                   on_step: Callable[[str], None]) -> list[RagBenchRow]:
    chunks = iter_chunks(docs, pipeline.config.chunk_tokens, tokenize)
    rows, held = [], 0
    for size in sizes:
        on_step(f"{store}: ingesting to {size:,} chunks")
        t0 = time.perf_counter()
        stats = pipeline.ingest_chunks("bench", _take(chunks, size - held), tokenize)
        ingest_s = time.perf_counter() - t0
        held = size
        on_step(f"{store}: {len(questions)} questions over {size:,} chunks")
        pipeline.query("bench", questions[0], budget, tokenize, retriever)  # warm-up
        latencies = []
        for question in questions:
            q0 = time.perf_counter()
            pipeline.query("bench", question, budget, tokenize, retriever)
            latencies.append(1000 * (time.perf_counter() - q0))
        rows.append(RagBenchRow(store, size, stats.added / ingest_s,
                                statistics.median(latencies), _p95(latencies),
                                len(questions), retriever))
    return rows


def bench_rag(source: Sequence[Doc], questions: Sequence[str], sizes: Sequence[int],
              tokenize: Callable[[str], list], embed: BaseEmbedding,
              stores: Sequence[str] = STORES, budget: int = 1024, chunk_tokens: int = 128,
              retriever: str = "dense", embed_batch: int = 64,
              on_step: Callable[[str], None] = lambda step: None) -> list[RagBenchRow]:
    """Each store in turn, into an empty store in a temporary folder, through ``sizes``."""
    if sorted(sizes) != list(sizes) or len(set(sizes)) != len(sizes) or sizes[0] < 1:
        raise ValueError(f"corpus sizes must be increasing whole numbers >= 1, got {sizes}")
    unknown = [s for s in stores if s not in STORES]
    if unknown or not stores:
        raise ValueError(f"stores must be among {', '.join(STORES)}, got {list(stores)}")
    if not questions:
        raise ValueError("the benchmark needs at least one question")
    rows: list[RagBenchRow] = []
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-rag-") as tmp:
        for store in stores:
            with ExitStack() as stack:
                if store == "embedded":
                    client = open_client(index_dir=Path(tmp) / "embedded")
                else:
                    client = open_client(url=stack.enter_context(
                        chroma_server(Path(tmp) / "server")))
                pipeline = RagPipeline(client, embed, RagConfig(
                    index_dir=Path(tmp) / store, chunk_tokens=chunk_tokens,
                    embed_batch=embed_batch))
                rows += _measure_store(pipeline, store, varied_docs(source), questions, sizes,
                                       tokenize, budget, retriever, on_step)
    return rows
