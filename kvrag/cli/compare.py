"""``kvrag compare``: every system on the identical questions, scored with its cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import (
    DeviceOption,
    DtypeOption,
    JudgeApiKeyOption,
    StepProgress,
    console,
    fail,
)
from kvrag.compression.spec import RECALL_AFTER, RECALL_CHUNK
from kvrag.data.loaders import LOADERS
from kvrag.evaluation.comparison import CompareSettings, ComparisonError, run_compare
from kvrag.evaluation.systems import SYSTEM_HELP
from kvrag.rag_stack.config import ORDERS

# Measured on the 200 demo questions with SmolLM2 (README): its full-context answers end
# within 43 tokens or loop until any limit (4%).
DEFAULT_MAX_NEW_TOKENS = 64
SYSTEMS_HELP = (f"Comma-separated systems; known: {', '.join(SYSTEM_HELP.values())}. "
                "OPTIONS: [key=value;...], the method's settings (snapkv[window=32;kernel=7]) "
                "and chunk=C (keep whole chunks of C tokens) or chunk=sentence, and "
                "heads=shared (one kept set for all KV heads of a layer) or heads=ranked (a "
                "layer's budget spread over its KV heads by score rank). "
                "once:METHOD[heads=shared;...]:RATIO+recall@TOKENS keeps what the corpus "
                "evicted in host memory and lets each question bring back up to TOKENS per "
                "layer (or +recall:SHARE of the document tokens), e.g. "
                "once:snapkv[chunk=16;heads=shared]:0.875+recall@192; +recall[OPTIONS]: "
                f"chunk=C (default {RECALL_CHUNK}), after=A (the A chunks after each found "
                f"one, default {RECALL_AFTER}), reprefill=0|1, window=W.")


def compare(
    out: Annotated[Path, typer.Option(help="Output directory (results.jsonl, summaries, plot).")],
    dataset: Annotated[
        str, typer.Option(help=("A .jsonl dataset path or LOFT directory; 'demo' for the "
                                "bundled suite, 'demo-shared' for its shared-corpus version "
                                "(10 corpora, 8 questions each), or 'needles' for the first "
                                "run's needle suite (24 questions over 6 corpora of about "
                                "1,500 tokens, which the packaged model can answer)."))
    ] = "demo",
    systems: Annotated[
        str, typer.Option(help=SYSTEMS_HELP)
    ] = "full",
    model: Annotated[
        str, typer.Option(help="A packaged model name (smollm2) or a local HF checkpoint dir.")
    ] = "smollm2",
    adapter: Annotated[Path | None, typer.Option(
        help="A PEFT LoRA adapter directory (kvrag train) applied to the model.")] = None,
    engine: Annotated[str, typer.Option(help=(
        "Engine: hf (transformers), sglang (the real SGLang engine with the kvrag plugin, "
        "started once for the run), or sglang-url (a running SGLang deployment, --url)."
    ))] = "hf",
    url: Annotated[str | None, typer.Option(help=(
        "sglang-url engine: the server or sglang-router, e.g. http://HOST:30000; --model "
        "names its tokenizer (a local checkpoint dir)."))] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="KVRAG_API_KEY", help="sglang-url engine: the server's API key.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    limit: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N questions.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help=f"Dataset format: auto, {', '.join(sorted(LOADERS))}.")
    ] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1, help=(
        "Generation budget per answer, the same for every system; answers that reach it are "
        "marked truncated. The default leaves fewer than 5% of the packaged model's full-"
        "context demo answers cut."))] = DEFAULT_MAX_NEW_TOKENS,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    index_dir: Annotated[Path | None, typer.Option(
        help="rag systems: embedded Chroma folder (default: $KVRAG_HOME/index).")] = None,
    chroma_url: Annotated[str | None, typer.Option(
        help="rag systems: a Chroma server URL instead of the embedded store.")] = None,
    chunk_tokens: Annotated[int, typer.Option(
        min=16, help="rag systems: chunk size in model tokens.")] = 128,
    embed_model: Annotated[Path | None, typer.Option(help=(
        "rag systems: a sentence-transformers model directory to embed with (default: the "
        "packaged all-MiniLM-L6-v2)."))] = None,
    rag_order: Annotated[str, typer.Option(
        help=f"rag systems: chunk order in the prompt, {' or '.join(ORDERS)}.")] = "score",
    max_prompt_tokens: Annotated[int | None, typer.Option(min=1, help=(
        "Refuse (or, with --fit-context, trim) prompts longer than this, chat template "
        "included (default: the model's context length less --max-new-tokens)."))] = None,
    questions_at_once: Annotated[int | None, typer.Option(min=1, help=(
        "KV per corpus in the summary: what this many of a corpus's questions hold while "
        "answered together (the shared prefix once, their own parts added); default: all "
        "of a corpus's questions. The answers are the same either way."))] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help=(
        "sglang engines: requests kept in flight, each answer stored as it lands (default: "
        "16 on CUDA and by URL, 1 on a CPU, where batching measured no faster; the hf "
        "engine answers one at a time)."))] = None,
    context_length: Annotated[int | None, typer.Option(
        min=1, help="sglang engine: SGLang --context-length (default: the model's).")] = None,
    max_total_tokens: Annotated[int | None, typer.Option(min=64, help=(
        "sglang engine: KV pool size in tokens (default: 16,384 on a CPU, SGLang's from "
        "memory on a GPU)."))] = None,
    mem_fraction_static: Annotated[float | None, typer.Option(min=0.01, max=0.99, help=(
        "sglang engine: SGLang --mem-fraction-static (default: 0.3 on a CPU, SGLang's on a "
        "GPU)."))] = None,
    tp_size: Annotated[int | None, typer.Option(
        min=1, help="sglang engine: tensor-parallel size (GPUs per model copy).")] = None,
    sglang_arg: Annotated[list[str] | None, typer.Option(help=(
        "sglang engine: any other SGLang option as KEY=VALUE (VALUE read as JSON where it "
        "parses), passed unchanged; repeatable."))] = None,
    judge_url: Annotated[str | None, typer.Option(help=(
        "Also rate every output 0-100 with an LLM judge shown the question, the gold "
        "answer and the documents the output cites, served at this OpenAI-compatible URL "
        "(e.g. `kvrag serve` at http://HOST:PORT/v1); the judge's model name is recorded "
        "with the run."))] = None,
    judge_model: Annotated[str | None, typer.Option(
        help="The judge's model name (default: the first the server lists).")] = None,
    judge_api_key: JudgeApiKeyOption = None,
    context_tokens: Annotated[str | None, typer.Option(help=(
        "A length sweep, e.g. 1000,2000,4000,8000: one sub-run per length into OUT/len-N, "
        "every question's prompt cut to N tokens (chat template included) by dropping "
        "non-gold documents, last first; then OUT/sweep.md and OUT/accuracy_vs_length.png. "
        "With --dataset demo the suite is generated at the longest length, so shorter "
        "ones hold the same questions over fewer distractors."))] = None,
    fit_context: Annotated[bool, typer.Option(
        "--fit-context", help=(
            "Trim prompts that do not fit by dropping non-gold documents, last first (never "
            "a gold one), instead of refusing them; every system answers the trimmed one."
        ))] = False,
) -> None:
    """Run each system on the same questions; resumes where an earlier run into OUT stopped.

    Writes OUT/results.jsonl (one line per question and system, flushed as it goes),
    OUT/summary.json, OUT/summary.md and OUT/accuracy_vs_kv.png; with --context-tokens,
    one such run per length in OUT/len-N/, then OUT/sweep.md and
    OUT/accuracy_vs_length.png.
    """
    settings = CompareSettings(
        out=out, dataset=dataset, systems=systems, model=model, adapter=adapter,
        engine=engine, url=url, api_key=api_key, device=device, dtype=dtype, limit=limit,
        fmt=fmt, max_new_tokens=max_new_tokens, seed=seed, index_dir=index_dir,
        chroma_url=chroma_url, chunk_tokens=chunk_tokens, embed_model=embed_model,
        rag_order=rag_order, max_prompt_tokens=max_prompt_tokens, concurrency=concurrency,
        context_length=context_length, max_total_tokens=max_total_tokens,
        mem_fraction_static=mem_fraction_static, tp_size=tp_size,
        sglang_args=sglang_arg or [], judge_url=judge_url, judge_model=judge_model,
        judge_api_key=judge_api_key, context_tokens=context_tokens, fit_context=fit_context,
        questions_at_once=questions_at_once)
    try:
        run_compare(settings, console, StepProgress)
    except ComparisonError as e:
        fail(str(e))
