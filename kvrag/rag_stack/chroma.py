"""Chroma clients: embedded ``PersistentClient`` by default, a ``chroma run`` server by URL
(which collections they hold: ``collection.py``)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import chromadb
from chromadb.api import ClientAPI

from kvrag.loopback import free_port
from kvrag.rag_stack.errors import ChromaUnavailableError, RagIndexError


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
    try:
        return chromadb.PersistentClient(path=str(path))
    except Exception as e:  # chromadb raises its own errors for a damaged store
        raise RagIndexError(f"the Chroma index at {path} cannot be read ({type(e).__name__}: "
                            f"{e}); move it away or delete it and run again: ingest "
                            "rebuilds it") from None


@contextmanager
def chroma_server(path: str | Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``chroma run`` (shipped with chromadb) on a free loopback port; yield its URL."""
    port = free_port()
    chroma = Path(sys.executable).parent / "chroma"
    proc = subprocess.Popen(
        [str(chroma), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                open_client(url=url)
                break
            except ChromaUnavailableError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)

