"""``kvrag bench``: speed and memory, as ratios to a baseline measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import console, fail
from kvrag.compression import METHODS, SpecError, queries_needed
from kvrag.engines.models import ModelNotFoundError, resolve_model

app = typer.Typer(help="Benchmarks (medians and ratios to a same-run baseline).",
                  no_args_is_help=True)


@app.command("compression")
def compression_cmd(
    model: Annotated[str, typer.Option(help="Packaged model name or checkpoint dir.")] = "smollm2",
    context_tokens: Annotated[
        int, typer.Option(min=200, help="Approximate document tokens in the prompt.")
    ] = 6000,
    methods: Annotated[
        str, typer.Option(help=f"Comma-separated methods; known: {', '.join(sorted(METHODS))}.")
    ] = ",".join(sorted(METHODS)),
    ratios: Annotated[str, typer.Option(help="Comma-separated ratios in [0, 1).")] = "0.5,0.9",
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens decoded per run.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per system; medians reported.")] = 3,
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
) -> None:
    """KV bytes, decode tokens/s and one-off compression time of each method vs `full`.

    One prefill of a long prompt is shared by every system; each system then decodes
    NEW_TOKENS tokens (EOS ignored) from its own cache, interleaved across REPEATS.
    """
    from kvrag.engines.benchmark import bench_compression, default_specs
    from kvrag.engines.hf import HFEngine

    try:
        specs = default_specs([m.strip() for m in methods.split(",")],
                              [float(r) for r in ratios.split(",")])
        model_path = resolve_model(model, console)
    except (SpecError, ModelNotFoundError, ValueError) as e:
        fail(str(e))
    engine = HFEngine(model_path, capture_queries=queries_needed(specs))
    with console.status("benchmarking") as status:
        n, prefill_s, rows = bench_compression(
            engine, specs, context_tokens, new_tokens, repeats,
            on_step=lambda label: status.update(f"benchmarking: {label}"))
    # Plain fixed-width text: it pastes into notes intact and never truncates a number.
    console.print(f"{model}: {n}-token prompt, prefill {prefill_s:.1f} s, {new_tokens} decoded "
                  f"tokens, median of {repeats} interleaved repeats", markup=False)
    header = ("system", "KV tokens", "KV MB", "KV/full", "decode tok/s", "speed/full",
              "compress s", "compress/prefill")
    lines = [header] + [
        (r.system, f"{r.kv_tokens:,.0f}", f"{r.kv_bytes / 2**20:.1f}",
         f"{r.kv_bytes_vs_full:.2f}", f"{r.decode_tok_s:.1f}", f"{r.decode_speed_vs_full:.2f}",
         f"{r.compress_s:.3f}", f"{r.compress_vs_prefill:.3f}")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        console.print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(line, widths, strict=True))),
                      markup=False, highlight=False)
    if out is not None:
        out.write_text(json.dumps({"prompt_tokens": n, "prefill_s": prefill_s,
                                   "rows": [r.to_json() for r in rows]}, indent=2) + "\n")


@app.command("rag")
def rag_cmd(
    dataset: Annotated[str, typer.Option(help="A .jsonl dataset, or 'demo'.")] = "demo",
    limit: Annotated[int, typer.Option(min=2, help="Corpora (instances) to use.")] = 40,
    budget: Annotated[int, typer.Option(min=1, help="Retrieval budget in tokens.")] = 1024,
    chunk_tokens: Annotated[int, typer.Option(min=16, help="Chunk size in tokens.")] = 128,
    model: Annotated[str, typer.Option(help="Model whose tokenizer counts tokens.")] = "smollm2",
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
) -> None:
    """Ingest chunks/s and query latency, embedded Chroma vs a `chroma run` server.

    Each backend ingests the same LIMIT corpora into an empty store, then answers each
    corpus's question once; a server is started on a free loopback port for the run.
    """
    from transformers import AutoTokenizer

    from kvrag.data.loaders import load_dataset
    from kvrag.data.schema import DatasetError
    from kvrag.rag_stack.benchmark import bench_rag
    from kvrag.rag_stack.embeddings import load_embedding

    try:
        instances = load_dataset(dataset)[:limit]
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model, console))
    except (DatasetError, ModelNotFoundError) as e:
        fail(str(e))
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    with console.status("benchmarking embedded and server Chroma"):
        rows = bench_rag(instances, tokenize, load_embedding(), budget, chunk_tokens)
    console.print(f"{len(instances)} corpora from {dataset}, {chunk_tokens}-token chunks, "
                  f"budget {budget}", markup=False)
    base = rows[0]
    for r in rows:
        console.print(
            f"{r.backend:<32} {r.chunks:>6} chunks  ingest {r.ingest_chunks_per_s:8.1f} "
            f"chunks/s ({r.ingest_chunks_per_s / base.ingest_chunks_per_s:.2f}x)  query "
            f"median {r.query_median_ms:7.1f} ms ({r.query_median_ms / base.query_median_ms:.2f}x)"
            f"  p90 {r.query_p90_ms:7.1f} ms", markup=False, highlight=False)
    if out is not None:
        out.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
