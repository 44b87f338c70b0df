"""Retrieve the top chunks for a question until a token budget is full."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chromadb.api.models.Collection import Collection
from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.vector_stores.chroma import ChromaVectorStore

from kvrag.data.prompt import format_doc
from kvrag.data.schema import Doc

ORDERS = ("score", "document")


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    doc_number: int
    title: str
    position: int
    text: str
    score: float

    def as_doc(self) -> Doc:
        return Doc(id=self.doc_id, title=self.title, text=self.text)

    def block(self) -> str:
        """The chunk as it appears in the prompt."""
        return format_doc(self.doc_number, self.as_doc())


def ranked(collection: Collection, embed: BaseEmbedding, question: str,
           top_k: int | None = None) -> list[Chunk]:
    """The collection's chunks (the best ``top_k``, default all), best first."""
    total = collection.count()
    if total == 0:
        return []
    index = VectorStoreIndex.from_vector_store(ChromaVectorStore(chroma_collection=collection),
                                               embed_model=embed)
    hits = index.as_retriever(similarity_top_k=min(top_k or total, total)).retrieve(question)
    return [Chunk(doc_id=hit.node.metadata["source_id"],
                  doc_number=int(hit.node.metadata["doc_number"]),
                  title=hit.node.metadata["title"], position=int(hit.node.metadata["position"]),
                  text=hit.node.get_content(), score=float(hit.score or 0.0))
            for hit in hits]


def retrieve(
    collection: Collection, embed: BaseEmbedding, question: str, budget: int,
    count_tokens: Callable[[str], int], order: str = "score",
) -> list[Chunk]:
    """Best-scoring chunks whose prompt blocks, joined, fit in ``budget`` tokens.

    Chunks are taken in score order, skipping any that would overflow the budget (the
    joined text is counted, since tokens can merge across block boundaries);
    ``order="document"`` then puts them back in corpus order (doc number, position).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown retrieval order {order!r}; use one of {ORDERS}")
    if budget <= 0:
        return []
    chosen: list[Chunk] = []
    context = ""
    for chunk in ranked(collection, embed, question):
        candidate = context + chunk.block()
        if count_tokens(candidate) <= budget:
            chosen.append(chunk)
            context = candidate
    if order == "document":
        chosen.sort(key=lambda c: (c.doc_number, c.position))
    return chosen
