"""kvrag's Chroma collections: their names, their metadata, and the checks on opening one.

One collection per corpus, chunk size, embedding model and tokenizer (chunks are cut and
their blocks counted in the model's tokens). A compare run names a corpus by its content (a
hash of the documents), so two variants of a question (two context lengths) never share a
collection; ``kvrag rag ingest`` by the name it is given. The name hashes all four and the
layout version, so it is always a valid Chroma name and an older layout is never read.

Metadata: ``kvrag_layout`` (what this module writes), ``corpus``, ``min_block_tokens`` (the
smallest chunk block stored, which stops retrieval scanning for a chunk that fits),
``revision`` (moved on by every batch that changed the chunks) and ``complete`` (the digest
of the corpus once an ingest finished, which later runs trust).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection

from kvrag.rag_stack.errors import RagIndexError

LAYOUT = 2  # chunk metadata with block_tokens; bump when stored chunks change shape
TOKENIZER_PROBE = "[DOC 12] Zoë's café\nThe 1,024 ships sailed at 07:45, didn't they?\n\n"


def tokenizer_fingerprint(tokenize: Callable[[str], list]) -> str:
    """Which tokenizer this is, from the ids it gives a probe string."""
    return hashlib.sha256(repr(list(tokenize(TOKENIZER_PROBE))).encode()).hexdigest()[:12]


def collection_name(corpus: str, chunk_tokens: int, embedding: str, tokenizer: str) -> str:
    key = f"{corpus}\0{chunk_tokens}\0{embedding}\0{tokenizer}\0{LAYOUT}"
    return f"kvrag-{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def _where(client: ClientAPI) -> str:
    settings = client.get_settings()
    if settings.is_persistent and settings.persist_directory:
        return f"the index {settings.persist_directory}"
    return f"the Chroma server {settings.chroma_server_host}:{settings.chroma_server_http_port}"


def _checked(client: ClientAPI, collection: Collection) -> Collection:
    if (collection.metadata or {}).get("kvrag_layout") != LAYOUT:
        raise RagIndexError(
            f"collection {collection.name} in {_where(client)} was not written by this "
            f"version of kvrag (metadata {collection.metadata}); delete it "
            f"(`chromadb` client: delete_collection({collection.name!r})) or use another "
            "--index-dir, then ingest again")
    return collection


def create_collection(client: ClientAPI, name: str, corpus: str) -> Collection:
    """The collection ``name``, made if new; refused if another writer made it."""
    try:
        collection = client.get_or_create_collection(
            name, metadata={"kvrag_layout": LAYOUT, "corpus": corpus})
    except Exception as e:  # chromadb raises its own errors for a broken store
        raise RagIndexError(f"cannot open collection {name} in {_where(client)} "
                            f"({type(e).__name__}: {e}); move the index away and ingest "
                            "again") from None
    return _checked(client, collection)


def open_collection(client: ClientAPI, name: str, corpus: str) -> Collection | None:
    """The ingested collection ``name``, or None where there is none."""
    try:
        collection = client.get_collection(name)
    except Exception as e:  # chromadb's NotFoundError, or its errors for a broken store
        if "does not exist" in str(e):
            return None
        raise RagIndexError(f"cannot open collection {name} of corpus {corpus!r} in "
                            f"{_where(client)} ({type(e).__name__}: {e}); move the index "
                            "away and ingest again") from None
    return _checked(client, collection)


def _update(collection: Collection, **values: object) -> None:
    collection.modify(metadata={**(collection.metadata or {}), **values})


def note_batch(collection: Collection, smallest: int, changed: bool) -> None:
    """After a written batch: keep ``min_block_tokens`` at the smallest block stored (never
    raised: a deleted chunk may leave it lower than needed, which only scans a little
    longer), and move ``revision`` on if the batch added or deleted chunks."""
    meta = collection.metadata or {}
    values: dict[str, object] = {}
    if meta.get("min_block_tokens") is None or smallest < meta["min_block_tokens"]:
        values["min_block_tokens"] = smallest
    if changed:
        values["revision"] = revision(collection) + 1
    if values:
        _update(collection, **values)


def revision(collection: Collection) -> int:
    """How many written batches changed the collection (indexes built on it keep it)."""
    return int((collection.metadata or {}).get("revision", 0))


def begin_ingest(collection: Collection, digest: str) -> None:
    """Forget another corpus's ``complete`` mark while this one is written over it."""
    if (collection.metadata or {}).get("complete") not in (None, "", digest):
        _update(collection, complete="")


def mark_complete(collection: Collection, digest: str) -> None:
    if (collection.metadata or {}).get("complete") != digest:
        _update(collection, complete=digest)


def is_complete(collection: Collection, digest: str) -> bool:
    return (collection.metadata or {}).get("complete") == digest


def min_block_tokens(collection: Collection) -> int:
    return int((collection.metadata or {}).get("min_block_tokens", 1))
