"""What can go wrong in the RAG stack, importable without LlamaIndex or Chroma."""

from __future__ import annotations


class RagIndexError(RuntimeError):
    """A collection kvrag cannot use; the message names it and says what to do."""


class ChromaUnavailableError(ConnectionError):
    """A Chroma server that cannot be reached; the message names the URL."""


class EmbeddingModelNotFoundError(FileNotFoundError):
    """The packaged embedding model is not installed."""
