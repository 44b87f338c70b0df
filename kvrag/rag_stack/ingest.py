"""Chunk documents with LlamaIndex and store them, embedded, in a Chroma collection.

Ingest streams: documents are chunked one at a time, and every ``embed_batch`` chunks the
batch's present ids are read back (a bounded query), its stale chunks deleted and its new
ones embedded and written. A killed ingest leaves whole batches behind, so a rerun skips
them and goes on where it stopped. Chunk ids hash the doc id, the chunk's position and its
text, so re-ingesting the same documents adds nothing, and a changed document's old chunks
are deleted.

Each chunk is stored with ``block_tokens``, the tokens of its block as the prompt shows it
(``[DOC i] title`` and text, after a blank line), so retrieval fills a budget by adding
numbers instead of tokenizing. The collection's metadata (``collection.py``) keeps the
smallest block and, once an ingest has finished, the digest of the corpus it holds in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from chromadb.api.models.Collection import Collection
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import MetadataMode, NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.vector_stores.chroma import ChromaVectorStore

from kvrag.data.prompt import format_doc
from kvrag.data.schema import Doc
from kvrag.rag_stack.collection import begin_ingest, mark_complete, note_batch
from kvrag.rag_stack.config import EMBED_BATCH

# A block is counted after the blank line that precedes it in a prompt (the header's or the
# previous block's), where its first tokens merge as they will there.
BLOCK_LEAD = "\n\n"


@dataclass(frozen=True)
class IngestStats:
    added: int
    removed: int
    unchanged: int


def iter_chunks(
    docs: Iterable[Doc], chunk_tokens: int, tokenize: Callable[[str], list],
) -> Iterator[list[TextNode]]:
    """Each doc's chunks of at most ``chunk_tokens`` tokens, one doc at a time.

    Metadata keeps the source doc id (``source_id``, also the node's LlamaIndex source),
    its title, its 1-based position in ``docs`` (the ``[DOC i]`` number the full-context
    prompt shows), the chunk's position in the doc and its prompt block's token count.
    """
    splitter = SentenceSplitter(chunk_size=chunk_tokens, chunk_overlap=0, tokenizer=tokenize)
    lead = len(tokenize(BLOCK_LEAD))
    for number, doc in enumerate(docs, start=1):
        nodes = []
        for position, text in enumerate(splitter.split_text(doc.text)):
            digest = hashlib.sha256(f"{doc.id}\0{position}\0{text}".encode()).hexdigest()
            block = BLOCK_LEAD + format_doc(number, Doc(doc.id, doc.title, text))
            nodes.append(TextNode(
                id_=digest[:32], text=text,
                metadata={"source_id": doc.id, "doc_number": number, "title": doc.title,
                          "position": position, "block_tokens": len(tokenize(block)) - lead},
                excluded_embed_metadata_keys=["source_id", "doc_number", "position",
                                              "block_tokens"],
                relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc.id)},
            ))
        yield nodes


def chunk_docs(
    docs: Sequence[Doc], chunk_tokens: int, tokenize: Callable[[str], list],
) -> list[TextNode]:
    """Every chunk of ``docs`` (``iter_chunks``), in order."""
    return [node for nodes in iter_chunks(docs, chunk_tokens, tokenize) for node in nodes]


def ingest(
    collection: Collection, chunks: Iterable[list[TextNode]], embed: BaseEmbedding,
    embed_batch: int = EMBED_BATCH, on_batch: Callable[[int, int], None] = lambda c, d: None,
    complete: str | None = None,
) -> IngestStats:
    """Store the chunks (a list per doc, as ``iter_chunks`` yields them); embed only those
    the collection lacks; drop a stored doc's chunks that are no longer among its own.

    ``on_batch(chunks, docs)`` follows each written batch. ``complete``: the corpus digest
    to record once every doc is in, which lets later runs skip the check.
    """
    if embed_batch < 1:
        raise ValueError(f"the embedding batch must be at least 1 chunk, got {embed_batch}")
    if complete is not None:
        begin_ingest(collection, complete)
    store = ChromaVectorStore(chroma_collection=collection)
    totals = [0, 0, 0]
    pending: list[list[TextNode]] = []
    for nodes in chunks:
        pending.append(nodes)
        if sum(len(n) for n in pending) >= embed_batch:
            _flush(collection, store, pending, embed, embed_batch, totals, on_batch)
            pending = []
    if pending:
        _flush(collection, store, pending, embed, embed_batch, totals, on_batch)
    if complete is not None:
        mark_complete(collection, complete)
    return IngestStats(*totals)


def _flush(collection: Collection, store: ChromaVectorStore, docs: list[list[TextNode]],
           embed: BaseEmbedding, embed_batch: int, totals: list[int],
           on_batch: Callable[[int, int], None]) -> None:
    nodes = [n for doc in docs for n in doc]
    doc_ids = sorted({n.metadata["source_id"] for n in nodes})
    existing = set(collection.get(where={"source_id": {"$in": doc_ids}}, include=[])["ids"]) \
        if doc_ids else set()
    wanted = {n.node_id for n in nodes}
    stale = sorted(existing - wanted)
    if stale:
        collection.delete(ids=stale)
    new = [n for n in nodes if n.node_id not in existing]
    for start in range(0, len(new), embed_batch):
        batch = new[start:start + embed_batch]
        vectors = embed.get_text_embedding_batch(
            [n.get_content(MetadataMode.EMBED) for n in batch])
        for node, vector in zip(batch, vectors, strict=True):
            node.embedding = vector
        store.add(list(batch))
    if nodes:
        note_batch(collection, min(n.metadata["block_tokens"] for n in nodes),
                   changed=bool(new or stale))
    totals[0] += len(new)
    totals[1] += len(stale)
    totals[2] += len(wanted & existing)
    on_batch(len(nodes), len(docs))
