"""Real Chroma both ways: an embedded PersistentClient and a `chroma run` server."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrag.rag_stack.chroma import chroma_server, open_client
from kvrag.rag_stack.embeddings import load_embedding


@pytest.fixture(scope="session")
def chroma_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Chroma server on a free loopback port, stopped after the session."""
    with chroma_server(tmp_path_factory.mktemp("chroma-server")) as url:
        yield url


@pytest.fixture(params=["embedded", "server"])
def client(request, tmp_path: Path):
    if request.param == "embedded":
        return open_client(index_dir=tmp_path / "index")
    return open_client(url=request.getfixturevalue("chroma_url"))


@pytest.fixture(scope="session")
def embed():
    return load_embedding()


@pytest.fixture(scope="session")
def tokenize(smollm2_tokenizer):
    return lambda text: smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
