"""Chroma clients: embedded ``PersistentClient`` by default, a ``chroma run`` server by URL.

One collection per corpus. A corpus is named by its owner (a dataset instance's id, or
the name given to ``kvrag rag ingest``); the collection name hashes that name and the chunk
size, so it is always a valid Chroma name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse

import chromadb
from chromadb.api import ClientAPI


class ChromaUnavailableError(ConnectionError):
    """A Chroma server that cannot be reached; the message names the URL."""


def open_client(index_dir: str | Path | None = None, url: str | None = None) -> ClientAPI:
    """A server client for ``url`` (checked with a heartbeat), else an embedded one."""
    if url is not None:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        try:
            client = chromadb.HttpClient(host=parsed.hostname or "localhost",
                                         port=parsed.port or 8000,
                                         ssl=parsed.scheme == "https")
            client.heartbeat()
        except Exception as e:  # chromadb raises several transport errors
            raise ChromaUnavailableError(
                f"cannot reach the Chroma server at {url} ({type(e).__name__}); start one with "
                "`chroma run --path DIR --port N` or drop --chroma-url to use the embedded store"
            ) from None
        return client
    path = Path(index_dir) if index_dir is not None else Path(".kvrag-index")
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path))


def collection_name(corpus: str, chunk_tokens: int) -> str:
    digest = hashlib.sha256(f"{corpus}\0{chunk_tokens}".encode()).hexdigest()[:40]
    return f"kvrag-{digest}"
