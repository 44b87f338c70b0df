"""The RAG pipeline a ``rag`` system runs: ingest, retrieve, recall.

It retrieves from the dataset's shared corpus where it has one (a built set's passages,
LOFT's corpus), else from the question's own documents. Collections are keyed by content,
so a corpus is embedded once however many questions (or context lengths) use it, and one
whose ingest finished is not checked again. Per-corpus work (its digest, its collection,
its BM25 index) is done the first time a corpus is seen, not once per question.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import TextNode

from kvrag.data.schema import Doc, Instance, docs_digest
from kvrag.rag_stack.chroma import open_client
from kvrag.rag_stack.chunk import Chunk
from kvrag.rag_stack.collection import (
    RagIndexError,
    collection_name,
    create_collection,
    is_complete,
    min_block_tokens,
    open_collection,
    tokenizer_fingerprint,
)
from kvrag.rag_stack.config import RagConfig
from kvrag.rag_stack.embeddings import embedding_model_id, load_embedding
from kvrag.rag_stack.ingest import IngestStats, ingest, iter_chunks
from kvrag.rag_stack.retrieve import retrieve
from kvrag.rag_stack.retrievers import RETRIEVERS, DenseRanker, Ranker


@dataclass(frozen=True)
class RagContext:
    docs: list[tuple[int, Doc]]  # (DOC number, chunk as a doc) for the prompt builder
    doc_recall: float | None  # share of gold docs with at least one retrieved chunk
    ingest_s: float  # near zero once the corpus is stored
    retrieval_s: float


OnBatch = Callable[[int, int], None]


class RagPipeline:
    def __init__(self, client: ClientAPI, embed: BaseEmbedding, config: RagConfig) -> None:
        self.client = client
        self.embed = embed
        self.config = config
        self.embedding = embedding_model_id(config.embed_model)
        self._ready: dict[str, Collection] = {}  # collection name -> ingested collection
        self._rankers: dict[tuple[str, str], Ranker] = {}
        # (corpus, tokenize) -> collection name: the tokenizer is probed once, not per question
        self._names: dict[tuple[str, Callable[[str], list]], str] = {}

    @classmethod
    def from_config(cls, config: RagConfig) -> RagPipeline:
        return cls(open_client(config.index_dir, config.chroma_url),
                   load_embedding(config.embed_model, config.embed_batch), config)

    def _name(self, corpus: str, tokenize: Callable[[str], list]) -> str:
        key = (corpus, tokenize)
        if key not in self._names:
            self._names[key] = collection_name(corpus, self.config.chunk_tokens, self.embedding,
                                               tokenizer_fingerprint(tokenize))
        return self._names[key]

    def ingest(self, corpus: str, docs: Iterable[Doc], tokenize: Callable[[str], list],
               on_batch: OnBatch = lambda chunks, docs: None,
               complete: str | None = None) -> IngestStats:
        """Chunk, embed and store ``docs`` as ``corpus``, streaming (``ingest.py``)."""
        return self.ingest_chunks(corpus, iter_chunks(docs, self.config.chunk_tokens, tokenize),
                                  tokenize, on_batch, complete)

    def ingest_chunks(self, corpus: str, chunks: Iterable[list[TextNode]],
                      tokenize: Callable[[str], list],
                      on_batch: OnBatch = lambda chunks, docs: None,
                      complete: str | None = None) -> IngestStats:
        """Store chunks made by ``iter_chunks`` (a list per doc) as ``corpus``."""
        name = self._name(corpus, tokenize)
        collection = create_collection(self.client, name, corpus)
        stats = ingest(collection, chunks, self.embed, self.config.embed_batch, on_batch,
                       complete)
        self._ready[name] = collection
        for key in [key for key in self._rankers if key[0] == name]:
            del self._rankers[key]  # rebuilt over what was written
        return stats

    def _collection(self, corpus: str, tokenize: Callable[[str], list]) -> Collection:
        name = self._name(corpus, tokenize)
        if name not in self._ready:
            collection = open_collection(self.client, name, corpus)
            if collection is None:
                raise RagIndexError(
                    f"no corpus {corpus!r} with {self.config.chunk_tokens}-token chunks of "
                    "this model's tokenizer here; run `kvrag rag ingest` first (same "
                    "--chunk-tokens, --model and index)")
            self._ready[name] = collection
        return self._ready[name]

    def ranker(self, corpus: str, tokenize: Callable[[str], list],
               retriever: str = "dense") -> Ranker:
        if retriever not in RETRIEVERS:
            raise ValueError(f"unknown retriever {retriever!r}; use one of "
                             f"{', '.join(RETRIEVERS)}")
        collection = self._collection(corpus, tokenize)
        key = (collection.name, retriever)
        if key not in self._rankers:
            self._rankers[key] = RETRIEVERS[retriever](collection, self.embed,
                                                       self.config.bm25_dir)
        return self._rankers[key]

    def query(self, corpus: str, question: str, budget: int, tokenize: Callable[[str], list],
              retriever: str = "dense") -> list[Chunk]:
        """The best chunks of an ingested corpus that fill ``budget`` tokens."""
        ranker = self.ranker(corpus, tokenize, retriever)
        return retrieve(ranker, question, budget, lambda text: len(tokenize(text)),
                        self.config.order, self.config.chunk_tokens,
                        min_block_tokens(self._collection(corpus, tokenize)))

    def top(self, corpus: str, question: str, k: int,
            tokenize: Callable[[str], list]) -> list[Chunk]:
        """The ``k`` best chunks of an ingested corpus by the dense retriever, best first."""
        ranker = self.ranker(corpus, tokenize)
        assert isinstance(ranker, DenseRanker)
        return ranker.top(question, k)

    def ensure(self, docs: Sequence[Doc], tokenize: Callable[[str], list],
               on_batch: OnBatch = lambda chunks, docs: None) -> str:
        """Ingest ``docs`` under their content digest unless a finished ingest holds them;
        returns the digest, the corpus's name."""
        key = docs_digest(docs)
        name = self._name(key, tokenize)
        if name in self._ready:
            return key
        collection = open_collection(self.client, name, key)
        if collection is not None and is_complete(collection, key):
            self._ready[name] = collection
        else:
            self.ingest(key, docs, tokenize, on_batch, complete=key)
        return key

    def context(self, instance: Instance, budget: int, tokenize: Callable[[str], list],
                corpus: Sequence[Doc] | None = None, retriever: str = "dense") -> RagContext:
        """Retrieve from ``corpus`` (a dataset's shared corpus), else from the instance's
        own documents; each is ingested the first time it is seen."""
        t0 = time.perf_counter()
        key = self.ensure(corpus if corpus is not None else instance.docs, tokenize)
        t1 = time.perf_counter()
        chunks = self.query(key, instance.question, budget, tokenize, retriever)
        t2 = time.perf_counter()
        found = {c.doc_id for c in chunks}
        recall = (len(found & set(instance.gold_doc_ids)) / len(instance.gold_doc_ids)
                  if instance.gold_doc_ids else None)
        return RagContext([(c.doc_number, c.as_doc()) for c in chunks], recall, t1 - t0, t2 - t1)
