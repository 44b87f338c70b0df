"""The RAG pipeline a ``rag:BUDGET`` system runs: ingest an instance's docs, retrieve, recall."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chromadb.api import ClientAPI
from llama_index.core.base.embeddings.base import BaseEmbedding

from kvrag.data.schema import Doc, Instance
from kvrag.rag_stack.chroma import collection_name, open_client
from kvrag.rag_stack.embeddings import load_embedding
from kvrag.rag_stack.ingest import IngestStats, chunk_docs, ingest
from kvrag.rag_stack.retrieve import ORDERS, Chunk, retrieve


@dataclass(frozen=True)
class RagConfig:
    index_dir: Path | None = None  # embedded Chroma folder (default .kvrag-index)
    chroma_url: str | None = None  # a `chroma run` server instead
    chunk_tokens: int = 128
    order: str = "score"  # or "document"

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise ValueError(f"chunk size must be at least 16 tokens, got {self.chunk_tokens}")
        if self.order not in ORDERS:
            raise ValueError(f"retrieval order must be one of {ORDERS}, got {self.order!r}")


@dataclass(frozen=True)
class RagContext:
    docs: list[tuple[int, Doc]]  # (DOC number, chunk as a doc) for the prompt builder
    doc_recall: float | None  # share of gold docs with at least one retrieved chunk
    ingest_s: float  # near zero once the corpus is stored
    retrieval_s: float


class RagPipeline:
    def __init__(self, client: ClientAPI, embed: BaseEmbedding, config: RagConfig) -> None:
        self.client = client
        self.embed = embed
        self.config = config

    @classmethod
    def from_config(cls, config: RagConfig) -> RagPipeline:
        return cls(open_client(config.index_dir, config.chroma_url), load_embedding(), config)

    def ingest(
        self, corpus: str, docs: list[Doc], tokenize: Callable[[str], list],
        on_batch: Callable[[int], None] = lambda n: None,
    ) -> IngestStats:
        collection = self.client.get_or_create_collection(
            collection_name(corpus, self.config.chunk_tokens), metadata={"corpus": corpus})
        nodes = chunk_docs(docs, self.config.chunk_tokens, tokenize)
        return ingest(collection, nodes, self.embed, on_batch=on_batch)

    def query(self, corpus: str, question: str, budget: int,
              count_tokens: Callable[[str], int]) -> list[Chunk]:
        collection = self.client.get_collection(collection_name(corpus, self.config.chunk_tokens))
        return retrieve(collection, self.embed, question, budget, count_tokens,
                        self.config.order)

    def context(self, instance: Instance, budget: int,
                tokenize: Callable[[str], list]) -> RagContext:
        """Retrieve from this instance's own documents only (ingested on first use)."""
        t0 = time.perf_counter()
        self.ingest(instance.id, instance.docs, tokenize)
        t1 = time.perf_counter()
        chunks = self.query(instance.id, instance.question, budget,
                            lambda text: len(tokenize(text)))
        t2 = time.perf_counter()
        found = {c.doc_id for c in chunks}
        recall = (len(found & set(instance.gold_doc_ids)) / len(instance.gold_doc_ids)
                  if instance.gold_doc_ids else None)
        return RagContext([(c.doc_number, c.as_doc()) for c in chunks], recall, t1 - t0, t2 - t1)
