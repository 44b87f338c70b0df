"""``kvrag rag``: use the RAG stack on your own documents."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kvrag.cli.common import IngestProgress, console, fail
from kvrag.data.schema import DatasetError
from kvrag.data.sources import read_docs
from kvrag.engines.models import ModelNotFoundError, kvrag_home, resolve_model
from kvrag.extras import require
from kvrag.rag_stack.config import EMBED_BATCH, ORDERS, RETRIEVER_NAMES, RagConfig
from kvrag.rag_stack.errors import (
    ChromaUnavailableError,
    EmbeddingModelNotFoundError,
    RagIndexError,
)

if TYPE_CHECKING:
    from kvrag.rag_stack.pipeline import RagPipeline

app = typer.Typer(help="Ingest documents into Chroma and query them.", no_args_is_help=True)

IndexDir = Annotated[Path | None, typer.Option(
    help="Embedded Chroma folder (default: $KVRAG_HOME/index).")]
ChromaUrl = Annotated[str | None, typer.Option(
    help="Use a Chroma server (`chroma run`) at this URL instead of the embedded store.")]
ChunkTokens = Annotated[int, typer.Option(min=16, help="Chunk size in model tokens.")]
Model = Annotated[str, typer.Option(help="Model whose tokenizer measures tokens.")]


def default_index_dir() -> Path:
    return kvrag_home() / "index"


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model, console))
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _pipeline(index_dir: Path | None, chroma_url: str | None, chunk_tokens: int,
              order: str = "score", embed_batch: int = EMBED_BATCH) -> RagPipeline:
    require("rag", "kvrag rag")
    from kvrag.rag_stack.pipeline import RagPipeline

    config = RagConfig(index_dir=index_dir or default_index_dir(), chroma_url=chroma_url,
                       chunk_tokens=chunk_tokens, order=order, embed_batch=embed_batch)
    return RagPipeline.from_config(config)


@app.command("ingest")
def ingest_cmd(
    source: Annotated[Path, typer.Argument(help="A folder of .txt/.md files, or a JSONL of "
                                                "{id, title, text} docs.")],
    corpus: Annotated[str, typer.Option(help="Name of the corpus (one collection each).")],
    index_dir: IndexDir = None, chroma_url: ChromaUrl = None, chunk_tokens: ChunkTokens = 128,
    model: Model = "smollm2",
    embed_batch: Annotated[int, typer.Option(
        min=1, help="Chunks embedded and written per batch; a killed ingest keeps every "
                    "written batch and a rerun goes on after them.")] = EMBED_BATCH,
) -> None:
    """Chunk, embed and store documents, streaming; re-ingesting unchanged documents adds
    nothing, and an interrupted ingest resumes where it stopped."""
    try:
        docs = read_docs(source)
        tokenize = _tokenizer(model)
        pipeline = _pipeline(index_dir, chroma_url, chunk_tokens, embed_batch=embed_batch)
        with IngestProgress(len(docs)) as progress:
            stats = pipeline.ingest(corpus, docs, tokenize, on_batch=progress.on_batch)
    except (DatasetError, ModelNotFoundError, ChromaUnavailableError,
            EmbeddingModelNotFoundError, RagIndexError) as e:
        fail(str(e))
    console.print(f"{corpus}: {len(docs)} documents; {stats.added} chunks added, "
                  f"{stats.removed} removed, {stats.unchanged} unchanged")


@app.command("query")
def query_cmd(
    question: Annotated[str, typer.Argument(help="The question to retrieve for.")],
    corpus: Annotated[str, typer.Option(help="The corpus name given at ingest.")],
    budget: Annotated[int, typer.Option(min=1, help="Prompt tokens for retrieved chunks.")] = 1024,
    order: Annotated[str, typer.Option(help=f"Chunk order: {', '.join(ORDERS)}.")] = "score",
    retriever: Annotated[str, typer.Option(
        help=f"How chunks are ranked: {', '.join(RETRIEVER_NAMES)} (BM25 and dense fused by "
             "reciprocal rank).")] = "dense",
    index_dir: IndexDir = None, chroma_url: ChromaUrl = None, chunk_tokens: ChunkTokens = 128,
    model: Model = "smollm2",
) -> None:
    """Print the chunks that fill BUDGET tokens, as the prompt would show them."""
    try:
        tokenize = _tokenizer(model)
        pipeline = _pipeline(index_dir, chroma_url, chunk_tokens, order)
        chunks = pipeline.query(corpus, question, budget, tokenize, retriever)
    except (ModelNotFoundError, ChromaUnavailableError, EmbeddingModelNotFoundError,
            RagIndexError, ValueError) as e:
        fail(str(e))
    for c in chunks:
        console.print(f"[bold]{c.doc_id}[/] (score {c.score:.3f})", highlight=False)
        console.print(c.block().rstrip(), markup=False, highlight=False)
        console.print()
    context = "".join(c.block() for c in chunks)
    console.print(f"{len(chunks)} chunks, {len(tokenize(context))} of {budget} tokens")
