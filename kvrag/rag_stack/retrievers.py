"""The retrievers a ``rag`` system can use, behind a registry: each ranks a collection's
chunks for a question and returns the best ``k``.

* ``dense``: the question's embedding against the chunks' (Chroma's HNSW index).
* ``bm25``: LlamaIndex's BM25 retriever (bm25s). It indexes in memory, so its index is
  persisted per collection beside the embedded store, and rebuilt when the collection's
  ``revision`` moved on.
* ``hybrid``: both, fused by reciprocal rank (LlamaIndex's fusion retriever, one query, no
  query generation).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from chromadb.api.models.Collection import Collection
from llama_index.core import VectorStoreIndex
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.core.retrievers.fusion_retriever import FUSION_MODES
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.vector_stores.utils import metadata_dict_to_node
from llama_index.vector_stores.chroma import ChromaVectorStore

from kvrag.rag_stack.chunk import Chunk
from kvrag.rag_stack.collection import revision

PAGE = 5000  # chunks read from Chroma per request while building a BM25 index


class Ranker(Protocol):
    def top(self, question: str, k: int) -> list[Chunk]: ...


def _chunks(hits: list[NodeWithScore]) -> list[Chunk]:
    return [Chunk.of(hit.node, float(hit.score or 0.0)) for hit in hits]


class DenseRanker:
    def __init__(self, collection: Collection, embed: BaseEmbedding) -> None:
        self.collection = collection
        self.count = collection.count()  # the pipeline builds a new ranker after an ingest
        self.index = VectorStoreIndex.from_vector_store(
            ChromaVectorStore(chroma_collection=collection), embed_model=embed)

    def retriever(self, k: int) -> BaseRetriever:
        return self.index.as_retriever(similarity_top_k=k)

    def top(self, question: str, k: int) -> list[Chunk]:
        k = min(k, self.count)
        return _chunks(self.retriever(k).retrieve(question)) if k else []


def _stored_nodes(collection: Collection) -> list[BaseNode]:
    """Every chunk of the collection as a LlamaIndex node, read in pages."""
    nodes: list[BaseNode] = []
    for offset in range(0, collection.count(), PAGE):
        page = collection.get(include=["documents", "metadatas"], limit=PAGE, offset=offset)
        nodes += [metadata_dict_to_node(meta, text=text)
                  for meta, text in zip(page["metadatas"], page["documents"], strict=True)]
    return nodes


class BM25Ranker:
    """BM25 over a collection's chunks, its index persisted under ``folder``."""

    def __init__(self, collection: Collection, folder: Path) -> None:
        from llama_index.retrievers.bm25 import BM25Retriever

        self.collection = collection
        self.count = collection.count()
        self._index = None
        if self.count == 0:
            return
        path = folder / collection.name
        stamp = {"revision": revision(collection), "count": self.count}
        stamp_file = path / "kvrag.json"
        if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
            built = BM25Retriever.from_defaults(nodes=_stored_nodes(collection))
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            built.persist(str(path))
            stamp_file.write_text(json.dumps(stamp))
        # read back from disk either way: the loaded index carries its chunks
        self._index = BM25Retriever.from_persist_dir(str(path), show_progress=False)

    def retriever(self, k: int):
        """A retriever of the best ``k`` chunks over the shared index: one per call, so
        questions answered at once never change each other's ``k``."""
        from llama_index.retrievers.bm25 import BM25Retriever

        index = self._index
        return BM25Retriever(existing_bm25=index.bm25, similarity_top_k=min(k, self.count),
                             stemmer=index.stemmer, skip_stemming=index.skip_stemming,
                             token_pattern=index.token_pattern)

    def top(self, question: str, k: int) -> list[Chunk]:
        if self._index is None or k == 0:
            return []
        return _chunks(self.retriever(k).retrieve(question))


class HybridRanker:
    """Dense and BM25 rankings fused by reciprocal rank; each contributes its best ``k``."""

    def __init__(self, dense: DenseRanker, bm25: BM25Ranker) -> None:
        self.dense = dense
        self.bm25 = bm25

    def top(self, question: str, k: int) -> list[Chunk]:
        k = min(k, self.dense.count)
        if k == 0:
            return []
        fusion = QueryFusionRetriever(
            [self.dense.retriever(k), self.bm25.retriever(k)], similarity_top_k=k,
            num_queries=1, mode=FUSION_MODES.RECIPROCAL_RANK, use_async=False,
            llm=MockLLM())  # never called: num_queries=1 generates no queries
        return _chunks(fusion.retrieve(question))


RankerFactory = Callable[[Collection, BaseEmbedding, Path], Ranker]
RETRIEVERS: dict[str, RankerFactory] = {
    "dense": lambda collection, embed, folder: DenseRanker(collection, embed),
    "bm25": lambda collection, embed, folder: BM25Ranker(collection, folder),
    "hybrid": lambda collection, embed, folder: HybridRanker(
        DenseRanker(collection, embed), BM25Ranker(collection, folder)),
}
