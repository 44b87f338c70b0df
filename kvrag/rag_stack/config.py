"""How a RAG pipeline is set up: plain settings, importable without LlamaIndex or Chroma."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_INDEX = Path(".kvrag-index")
EMBED_BATCH = 64  # chunks embedded and written per flush
ORDERS = ("score", "document")  # chunk order in the prompt
RETRIEVER_NAMES = ("dense", "bm25", "hybrid")  # the keys of retrievers.RETRIEVERS


@dataclass(frozen=True)
class RagConfig:
    index_dir: Path | None = None  # embedded Chroma folder (default .kvrag-index)
    chroma_url: str | None = None  # a `chroma run` server instead
    chunk_tokens: int = 128
    order: str = "score"  # or "document"
    embed_model: Path | None = None  # a sentence-transformers directory (default: MiniLM)
    embed_batch: int = EMBED_BATCH

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise ValueError(f"chunk size must be at least 16 tokens, got {self.chunk_tokens}")
        if self.order not in ORDERS:
            raise ValueError(f"retrieval order must be one of {ORDERS}, got {self.order!r}")
        if self.embed_batch < 1:
            raise ValueError(f"the embedding batch must be at least 1, got {self.embed_batch}")

    @property
    def bm25_dir(self) -> Path:
        """Where BM25 indexes are persisted, per collection (also for a server store)."""
        return (self.index_dir or DEFAULT_INDEX) / "bm25"
