"""The RAG pipeline a ``rag:BUDGET`` system runs: ingest, retrieve, recall.

It retrieves from the dataset's shared corpus where it has one (a built set's passages,
LOFT's corpus), else from the question's own documents. Collections are keyed by content,
so a corpus is embedded once however many questions (or context lengths) use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chromadb.api import ClientAPI
from llama_index.core.base.embeddings.base import BaseEmbedding

from kvrag.data.schema import Doc, Instance, docs_digest
from kvrag.rag_stack.chroma import collection_name, open_client
from kvrag.rag_stack.embeddings import embedding_model_id, load_embedding
from kvrag.rag_stack.ingest import IngestStats, chunk_docs, ingest
from kvrag.rag_stack.retrieve import ORDERS, Chunk, ranked, retrieve


@dataclass(frozen=True)
class RagConfig:
    index_dir: Path | None = None  # embedded Chroma folder (default .kvrag-index)
    chroma_url: str | None = None  # a `chroma run` server instead
    chunk_tokens: int = 128
    order: str = "score"  # or "document"
    embed_model: Path | None = None  # a sentence-transformers directory (default: MiniLM)

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
        self.embedding = embedding_model_id(config.embed_model)
        self._ingested: set[str] = set()

    @classmethod
    def from_config(cls, config: RagConfig) -> RagPipeline:
        return cls(open_client(config.index_dir, config.chroma_url),
                   load_embedding(config.embed_model), config)

    def _collection_name(self, corpus: str) -> str:
        return collection_name(corpus, self.config.chunk_tokens, self.embedding)

    def ingest(
        self, corpus: str, docs: list[Doc], tokenize: Callable[[str], list],
        on_batch: Callable[[int], None] = lambda n: None,
    ) -> IngestStats:
        collection = self.client.get_or_create_collection(
            self._collection_name(corpus), metadata={"corpus": corpus})
        nodes = chunk_docs(docs, self.config.chunk_tokens, tokenize)
        return ingest(collection, nodes, self.embed, on_batch=on_batch)

    def query(self, corpus: str, question: str, budget: int,
              count_tokens: Callable[[str], int]) -> list[Chunk]:
        collection = self.client.get_collection(self._collection_name(corpus))
        return retrieve(collection, self.embed, question, budget, count_tokens,
                        self.config.order)

    def top(self, corpus: str, question: str, k: int) -> list[Chunk]:
        """The ``k`` best chunks of an ingested corpus, best first."""
        return ranked(self.client.get_collection(self._collection_name(corpus)), self.embed,
                      question, k)

    def context(self, instance: Instance, budget: int, tokenize: Callable[[str], list],
                corpus: list[Doc] | None = None) -> RagContext:
        """Retrieve from ``corpus`` (a dataset's shared corpus), else from the instance's
        own documents; each is ingested the first time it is seen."""
        docs = corpus if corpus is not None else instance.docs
        key = docs_digest(docs)
        t0 = time.perf_counter()
        if key not in self._ingested:
            self.ingest(key, docs, tokenize)
            self._ingested.add(key)
        t1 = time.perf_counter()
        chunks = self.query(key, instance.question, budget, lambda text: len(tokenize(text)))
        t2 = time.perf_counter()
        found = {c.doc_id for c in chunks}
        recall = (len(found & set(instance.gold_doc_ids)) / len(instance.gold_doc_ids)
                  if instance.gold_doc_ids else None)
        return RagContext([(c.doc_number, c.as_doc()) for c in chunks], recall, t1 - t0, t2 - t1)
