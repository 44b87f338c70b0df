"""Real Chroma both ways: an embedded PersistentClient and a `chroma run` server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvrag.rag_stack.chroma import open_client
from kvrag.rag_stack.embeddings import load_embedding


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Chroma server on a free loopback port, stopped after the session."""
    port = free_port()
    chroma = Path(sys.executable).parent / "chroma"
    proc = subprocess.Popen(
        [str(chroma), "run", "--path", str(tmp_path_factory.mktemp("chroma-server")),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            open_client(url=url)
            break
        except ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("chroma run did not come up") from None
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(params=["embedded", "server"])
def client(request, tmp_path: Path):
    if request.param == "embedded":
        return open_client(index_dir=tmp_path / "index")
    return open_client(url=request.getfixturevalue("chroma_server"))


@pytest.fixture(scope="session")
def embed():
    return load_embedding()


@pytest.fixture(scope="session")
def tokenize(smollm2_tokenizer):
    return lambda text: smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
