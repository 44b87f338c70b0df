"""Chunk documents with LlamaIndex and store them, embedded, in a Chroma collection.

Chunk ids hash the doc id, the chunk's position and its text, so re-ingesting the same
documents adds nothing, and a changed document's old chunks are deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chromadb.api.models.Collection import Collection
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import MetadataMode, NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.vector_stores.chroma import ChromaVectorStore

from kvrag.data.schema import Doc


@dataclass(frozen=True)
class IngestStats:
    added: int
    removed: int
    unchanged: int


def chunk_docs(
    docs: Sequence[Doc], chunk_tokens: int, tokenize: Callable[[str], list],
) -> list[TextNode]:
    """Split each doc's text into chunks of at most ``chunk_tokens`` tokens.

    Metadata keeps the source doc id (``source_id``, also the node's LlamaIndex source),
    its title, and its 1-based position in ``docs`` (the ``[DOC i]`` number the
    full-context prompt shows).
    """
    splitter = SentenceSplitter(chunk_size=chunk_tokens, chunk_overlap=0, tokenizer=tokenize)
    nodes = []
    for number, doc in enumerate(docs, start=1):
        for position, text in enumerate(splitter.split_text(doc.text)):
            digest = hashlib.sha256(f"{doc.id}\0{position}\0{text}".encode()).hexdigest()
            nodes.append(TextNode(
                id_=digest[:32], text=text,
                metadata={"source_id": doc.id, "doc_number": number, "title": doc.title,
                          "position": position},
                excluded_embed_metadata_keys=["source_id", "doc_number", "position"],
                relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc.id)},
            ))
    return nodes


def ingest(
    collection: Collection, nodes: Sequence[TextNode], embed: BaseEmbedding,
    batch_size: int = 64, on_batch: Callable[[int], None] = lambda n: None,
) -> IngestStats:
    """Store ``nodes``; embed only chunks the collection lacks; drop stale ones."""
    doc_ids = sorted({n.metadata["source_id"] for n in nodes})
    existing = set(collection.get(where={"source_id": {"$in": doc_ids}}, include=[])["ids"]) \
        if doc_ids else set()
    wanted = {n.node_id for n in nodes}
    stale = sorted(existing - wanted)
    if stale:
        collection.delete(ids=stale)
    new = [n for n in nodes if n.node_id not in existing]
    store = ChromaVectorStore(chroma_collection=collection)
    for start in range(0, len(new), batch_size):
        batch = new[start:start + batch_size]
        vectors = embed.get_text_embedding_batch([n.get_content(MetadataMode.EMBED) for n in batch])
        for node, vector in zip(batch, vectors, strict=True):
            node.embedding = vector
        store.add(list(batch))
        on_batch(len(batch))
    return IngestStats(added=len(new), removed=len(stale), unchanged=len(wanted & existing))
