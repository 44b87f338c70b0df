"""``kvrag bench``: speed and memory, as ratios to a baseline measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import DeviceOption, DtypeOption, console, fail, need
from kvrag.compression import METHODS, SpecError, queries_needed, split_specs
from kvrag.engines.models import ModelNotFoundError, resolve_model

app = typer.Typer(help="Benchmarks (medians and ratios to a same-run baseline).",
                  no_args_is_help=True)


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Plain fixed-width text: it pastes into notes intact and never truncates a number."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        console.print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(line, widths, strict=True))),
                      markup=False, highlight=False)


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
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """KV bytes, decode tokens/s and one-off compression time of each method vs `full`.

    One prefill of a long prompt is shared by every system; each system then decodes
    NEW_TOKENS tokens (EOS ignored) from its own cache, interleaved across REPEATS.
    """
    from kvrag.bench.compression import bench_compression, default_specs
    from kvrag.engines.device import resolve
    from kvrag.engines.hf import HFEngine

    try:
        placement = resolve(device, dtype)
        specs = default_specs(split_specs(methods),
                              [float(r) for r in ratios.split(",")])
        model_path = resolve_model(model, console)
    except (SpecError, ModelNotFoundError, ValueError) as e:  # DeviceError is a ValueError
        fail(str(e))
    engine = HFEngine(model_path, capture_queries=queries_needed(specs),
                      device=placement.device, dtype=placement.dtype)
    with console.status("benchmarking") as status:
        n, prefill_s, rows = bench_compression(
            engine, specs, context_tokens, new_tokens, repeats,
            on_step=lambda label: status.update(f"benchmarking: {label}"))
    console.print(f"{model} on {placement.device} in {placement.dtype_name}: {n}-token prompt, "
                  f"prefill {prefill_s:.1f} s, {new_tokens} decoded tokens, median of "
                  f"{repeats} interleaved repeats", markup=False)
    _print_table(
        ("system", "KV tokens", "KV MB", "KV/full", "decode tok/s", "speed/full",
         "compress s", "compress/prefill"),
        [(r.system, f"{r.kv_tokens:,.0f}", f"{r.kv_bytes / 2**20:.1f}",
          f"{r.kv_bytes_vs_full:.2f}", f"{r.decode_tok_s:.1f}", f"{r.decode_speed_vs_full:.2f}",
          f"{r.compress_s:.3f}", f"{r.compress_vs_prefill:.3f}") for r in rows])
    if out is not None:
        out.write_text(json.dumps({"prompt_tokens": n, "prefill_s": prefill_s,
                                   "rows": [r.to_json() for r in rows]}, indent=2) + "\n")


@app.command("rag")
def rag_cmd(
    corpus_chunks: Annotated[str, typer.Option(
        help="Corpus sizes in chunks, increasing; one collection grows through them.")
    ] = "1000,10000,100000",
    source: Annotated[Path | None, typer.Option(
        help="Documents to vary into the corpus: a folder of .txt/.md files or a JSONL of "
             "{id, title, text} (default: the demo's documents).")] = None,
    questions: Annotated[int, typer.Option(
        min=2, help="Questions timed at each size (the demo's questions).")] = 50,
    stores: Annotated[str, typer.Option(
        help="Chroma stores to measure: embedded, server (a `chroma run` on a free port), "
             "or both.")] = "embedded,server",
    retriever: Annotated[str, typer.Option(
        help="dense, bm25 or hybrid (BM25 builds its index at the first question of a "
             "size).")] = "dense",
    budget: Annotated[int, typer.Option(min=1, help="Retrieval budget in tokens.")] = 1024,
    chunk_tokens: Annotated[int, typer.Option(min=16, help="Chunk size in tokens.")] = 128,
    embed_batch: Annotated[int, typer.Option(min=1, help="Chunks embedded per batch.")] = 64,
    model: Annotated[str, typer.Option(help="Model whose tokenizer counts tokens.")] = "smollm2",
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
) -> None:
    """Ingest chunks/s and per-question retrieval latency as the corpus grows.

    For each store, one empty collection grows through --corpus-chunks: each step ingests
    the chunks it adds (embedding included) and times --questions retrievals to --budget
    tokens (after one untimed warm-up). Latency ratios are against the smallest size of
    the same store; retrieval that reads the whole corpus would grow with it.
    """
    from transformers import AutoTokenizer

    from kvrag.data.demo import make_demo
    from kvrag.data.schema import DatasetError
    from kvrag.data.sources import read_docs
    from kvrag.rag_stack.config import RETRIEVER_NAMES

    need("rag", "kvrag bench rag")
    from kvrag.bench.rag import STORES, bench_rag
    from kvrag.rag_stack.embeddings import load_embedding

    try:
        sizes = [int(s) for s in corpus_chunks.split(",")]
    except ValueError:
        fail(f"--corpus-chunks takes comma-separated whole numbers, got {corpus_chunks!r}")
    chosen = [s.strip() for s in stores.split(",") if s.strip()]
    if not chosen or any(s not in STORES for s in chosen):
        fail(f"--stores takes {', '.join(STORES)} (comma-separated), got {stores!r}")
    if retriever not in RETRIEVER_NAMES:
        fail(f"--retriever takes one of {', '.join(RETRIEVER_NAMES)}, got {retriever!r}")
    demo = make_demo()
    try:
        docs = read_docs(source) if source is not None else list(
            {d.id: d for inst in demo for d in inst.docs}.values())
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model, console))
    except (DatasetError, ModelNotFoundError) as e:
        fail(str(e))
    if not docs:
        fail(f"{source} holds no documents")
    asked = [inst.question for inst in demo[:questions]]
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    try:
        with console.status("benchmarking") as status:
            rows = bench_rag(docs, asked, sizes, tokenize, load_embedding(), chosen, budget,
                             chunk_tokens, retriever, embed_batch, on_step=status.update)
    except ValueError as e:
        fail(str(e))
    console.print(f"{len(docs)} source documents varied, {chunk_tokens}-token chunks, "
                  f"budget {budget}, {retriever} retriever, {len(asked)} questions per size",
                  markup=False)
    cells = []
    for r in rows:
        base = next(b for b in rows if b.store == r.store)
        cells.append((r.store, f"{r.chunks:,}", f"{r.ingest_chunks_per_s:,.0f}",
                      f"{r.retrieval_median_ms:.1f}", f"{r.retrieval_p95_ms:.1f}",
                      f"{r.retrieval_median_ms / base.retrieval_median_ms:.2f}x"))
    _print_table(("store", "chunks", "ingest chunks/s", "retrieval median ms", "p95 ms",
                  "median vs smallest"), cells)
    if out is not None:
        out.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")


@app.command("serving")
def serving_cmd(
    model: Annotated[str, typer.Option(help="Packaged model name or checkpoint dir.")] = "smollm2",
    method: Annotated[str, typer.Option(help="Compression method of the plugin rows.")] = "snapkv",
    ratios: Annotated[str, typer.Option(help="Comma-separated ratios in [0, 1).")] = "0,0.5,0.9",
    context_tokens: Annotated[
        int, typer.Option(min=200, help="Approximate document tokens in each prompt.")
    ] = 6000,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens decoded per request.")] = 32,
    repeats: Annotated[int, typer.Option(
        min=1, help=("Requests per system, one at a time; medians (single-request mode; with "
                     "--shared-corpus, how often question 1 builds what the others reuse)."))
    ] = 3,
    concurrency: Annotated[int, typer.Option(min=1, help=(
        "Above 1: send this many distinct long requests at once against a pool of "
        "--pool-tokens, and report requests running at once, tokens/s, TTFT and TPOT."))] = 1,
    pool_tokens: Annotated[int | None, typer.Option(min=1, help=(
        "KV pool size in tokens with --concurrency (default: what holds 4 full requests)."))
    ] = None,
    shared_corpus: Annotated[int | None, typer.Option(min=2, help=(
        "Send this many questions over one corpus through full, and METHOD:RATIO per "
        "question and once:METHOD:RATIO for each of --ratios, in one kvrag engine; report "
        "the KV slots each holds while all questions decode, beside what its spec implies, "
        "and the median time to first token of questions 2..Q; ratios to full."))] = None,
    recall: Annotated[str, typer.Option(help=(
        "With --shared-corpus: comma-separated recall budgets R, each adding a "
        "once:METHOD:RATIO+recall@R row per ratio (METHOD must keep shared heads, e.g. "
        "--method 'snapkv[chunk=16;heads=shared]')."))] = "",
    decode_path: Annotated[str, typer.Option(help=(
        "Who decodes in the kvrag engine: auto (python over torch_native, else the inner "
        "backend), python, or inner."))] = "auto",
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """SGLang's own backend vs the kvrag backend over it, one request at a time or under load.

    The baseline is the backend kvrag wraps there: torch_native on a CPU, triton on CUDA
    (CUDA graphs off for both). Starts a baseline engine, then a kvrag engine, one after
    the other. One request at a time (the default): the same long prompt to each system;
    KV slots, prefill s, decode tok/s, and whether greedy tokens equal the baseline's.
    With --concurrency N: N distinct prompts at once against a fixed pool; the most
    requests decoding at once beside the bound memory alone sets, output tokens/s over the
    run, median TTFT and TPOT. Ratios are to the baseline measured in the same run.
    With --shared-corpus Q: many questions over one corpus, compress-once against the
    prefix cache and per-question compression.
    """
    from kvrag.compression import parse_spec
    from kvrag.engines.device import resolve

    need("sglang", "kvrag bench serving")

    try:
        placement = resolve(device, dtype)
        ratio_list = [float(r) for r in ratios.split(",")]
        recall_list = tuple(int(r) for r in recall.split(",") if r.strip())
        for ratio in ratio_list:
            parse_spec(f"{method}:{ratio}")
            for budget in recall_list:
                parse_spec(f"once:{method}:{ratio}+recall@{budget}")
        if decode_path not in ("auto", "python", "inner"):
            raise ValueError(f"--decode-path {decode_path!r}: use auto, python or inner")
        model_path = resolve_model(model, console)
    except (SpecError, ModelNotFoundError, ValueError) as e:  # DeviceError is a ValueError
        fail(str(e))
    if shared_corpus is not None:
        _serving_shared(model_path, model, method, tuple(ratio_list), shared_corpus,
                        context_tokens, new_tokens, pool_tokens, placement, decode_path, out,
                        repeats, recall_list)
        return
    if concurrency > 1:
        _serving_load(model_path, model, method, ratio_list, concurrency, context_tokens,
                      new_tokens, pool_tokens, placement, decode_path, out)
        return
    from kvrag.bench.serving import base_backend, bench_serving

    with console.status("benchmarking") as status:
        n, rows = bench_serving(model_path, method, ratio_list, context_tokens, new_tokens,
                                repeats, on_step=lambda label: status.update(label),
                                placement=placement, decode_path=decode_path)
    console.print(f"{model} on {placement.device} in {placement.dtype_name}: {n}-token "
                  f"prompt, {new_tokens} decoded tokens, median of {repeats} repeats; ratios "
                  f"to {base_backend(placement)}", markup=False)
    _print_serving(rows)
    if out is not None:
        out.write_text(json.dumps({"prompt_tokens": n, "rows": [r.to_json() for r in rows]},
                                  indent=2) + "\n")


def _run_bench(label: str, bench, *args, **kwargs):
    """``bench(*args, on_step=..., **kwargs)`` under a status line; a ValueError fails."""
    try:
        with console.status(label) as status:
            return bench(*args, on_step=lambda step: status.update(step), **kwargs)
    except ValueError as e:
        fail(str(e))


def _serving_load(model_path, model, method, ratios, concurrency, context_tokens, new_tokens,
                  pool_tokens, placement, decode_path, out) -> None:
    from kvrag.bench.serving import base_backend
    from kvrag.bench.serving_load import bench_serving_load

    settings, rows = _run_bench(
        "benchmarking under load", bench_serving_load, model_path, method, ratios,
        concurrency, context_tokens, new_tokens, pool_tokens, placement=placement,
        decode_path=decode_path)
    console.print(
        f"{model} on {placement.device} in {placement.dtype_name}: {settings['requests']} "
        f"requests at once, median {settings['prompt_tokens_median']:.0f}-token prompts, "
        f"{new_tokens} decoded tokens each, KV pool {settings['pool_tokens']:,} tokens; "
        f"ratios to {base_backend(placement)}", markup=False)
    _print_load(rows)
    _write_rows(out, settings, rows)


def _serving_shared(model_path, model, method, ratios, questions, context_tokens, new_tokens,
                    pool_tokens, placement, decode_path, out, repeats, recall) -> None:
    from kvrag.bench.serving_shared import bench_serving_shared

    settings, rows = _run_bench(
        "benchmarking a shared corpus", bench_serving_shared, model_path, method, ratios,
        questions, context_tokens, new_tokens, pool_tokens, placement=placement,
        decode_path=decode_path, repeats=repeats, recall=recall)
    console.print(
        f"{model} on {placement.device} in {placement.dtype_name}: {questions} questions over "
        f"one {settings['corpus_prefix_tokens']:,}-token corpus prefix (kept by each once: "
        f"spec: {', '.join(f'{k} {v:,}' for k, v in settings['kept_prefix_tokens'].items())}"
        f"), median {settings['question_tokens_median']:.0f} "
        f"question tokens, {new_tokens} decoded tokens each, KV pool "
        f"{settings['pool_tokens']:,} tokens; ratios to full", markup=False)
    _print_table(
        ("system", "KV slots held", "implied", "held/implied", "held/full", "running",
         "host KV MiB", "TTFT 2..Q s", "TTFT/full", "TTFT q1 s", "q1/full"),
        [(r.system, f"{r.slots_held:,}", f"{r.slots_implied:,.0f}", f"{r.held_vs_implied:.2f}",
          f"{r.held_vs_full:.2f}", str(r.running_at_peak),
          f"{r.host_kv_bytes / 2**20:.1f}" if r.host_kv_bytes else "–",
          f"{r.ttft_s_median:.2f}", f"{r.ttft_vs_full:.2f}", f"{r.ttft_first_s:.1f}",
          f"{r.first_vs_full:.2f}")
         for r in rows])
    _write_rows(out, settings, rows)


def _write_rows(out: Path | None, settings: dict, rows) -> None:
    if out is not None:
        out.write_text(json.dumps({"settings": settings, "rows": [r.to_json() for r in rows]},
                                  indent=2) + "\n")


def _print_load(rows) -> None:
    _print_table(
        ("system", "running", "bound", "run/bound", "run/base", "tok/s", "tok/s/base",
         "TTFT s", "TTFT/base", "TPOT s", "TPOT/base", "KV/request", "same tokens"),
        [(r.system, str(r.max_running_requests), str(r.bound_running_requests),
          f"{r.running_vs_bound:.2f}", f"{r.running_vs_base:.2f}",
          f"{r.decode_tokens_per_s:.2f}", f"{r.decode_vs_base:.2f}", f"{r.ttft_s_median:.1f}",
          f"{r.ttft_vs_base:.2f}", f"{r.tpot_s_median:.3f}", f"{r.tpot_vs_base:.2f}",
          f"{r.kv_tokens_median:,.0f}", "yes" if r.same_tokens_as_base else "no")
         for r in rows])


def _print_serving(rows) -> None:
    _print_table(
        ("system", "= base", "= inner", "KV slots", "KV/base", "prefill s", "prefill/base",
         "decode tok/s", "speed/base", "compress s"),
        [(r.system, "yes" if r.same_tokens_as_base else "no",
          "yes" if r.same_tokens_as_inner else "no", f"{r.kv_slots:,.0f}",
          f"{r.kv_vs_base:.2f}", f"{r.prefill_s:.1f}", f"{r.prefill_vs_base:.2f}",
          f"{r.decode_tok_s:.2f}", f"{r.decode_speed_vs_base:.2f}", f"{r.compress_s:.3f}")
         for r in rows])


@app.command("fleet")
def fleet_cmd(
    model: Annotated[str, typer.Option(help="Packaged model name or checkpoint dir.")] = "smollm2",
    workers: Annotated[int, typer.Option(min=1, help="kvrag serve workers to start.")] = 2,
    corpora: Annotated[int, typer.Option(min=1, help="Corpora asked about.")] = 4,
    questions: Annotated[int, typer.Option(min=2, help="Questions per corpus.")] = 4,
    system: Annotated[str, typer.Option(
        help="The compressed system routed (a once: spec shows builds and hits).")
    ] = "once:snapkv:0.5",
    policies: Annotated[str, typer.Option(help=(
        "Comma-separated sglang-router policies for the system: cache_aware, round_robin, "
        "manual (one worker per corpus, by X-SMG-Routing-Key). full always runs behind "
        "cache_aware as the baseline."))] = "cache_aware,round_robin,manual",
    dataset: Annotated[str, typer.Option(help=(
        "Questions with corpus ids: 'demo-shared' (bundled) or a .jsonl path."))
    ] = "demo-shared",
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens decoded per question.")] = 8,
    concurrency: Annotated[int | None, typer.Option(
        min=1, help="Requests in flight (default: one per worker).")] = None,
    max_total_tokens: Annotated[int, typer.Option(
        min=64, help="Each worker's KV pool in tokens.")] = 32768,
    seed: Annotated[int, typer.Option(help="Seed of the question order.")] = 0,
    out: Annotated[Path | None, typer.Option(help=(
        "Also write the rows as JSON here (worker and router logs beside it)."))] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Compressed corpora behind sglang-router: builds, reuse and fleet memory per policy.

    Starts WORKERS kvrag serve processes on loopback ports and, for each arm, a fresh
    sglang-router in front of them (python -m sglang_router.launch_router), with one
    random API key. CORPORA x QUESTIONS questions go through the router in one seeded
    random order. Per arm: how many times each corpus was built in the fleet, the share of
    follow-up questions that reused what a worker held, the KV slots the workers' pools
    hold afterwards (summed, read from each pool), and the median time to first token of
    follow-ups; ratios to full behind the cache-aware router, measured in the same run.
    """
    import secrets

    need("sglang", "kvrag bench fleet")
    need("router", "kvrag bench fleet")
    from kvrag.bench.fleet import bench_fleet, fleet_logs, shared_questions
    from kvrag.bench.fleet_processes import POLICIES, Fleet, FleetError
    from kvrag.compression import parse_spec
    from kvrag.compression.capabilities import Target, check
    from kvrag.data.loaders import load_dataset

    try:
        policy_list = tuple(p.strip() for p in policies.split(",") if p.strip())
        if unknown := [p for p in policy_list if p not in POLICIES]:
            raise ValueError(f"unknown routing policy {unknown[0]!r}; use {', '.join(POLICIES)}")
        check(parse_spec(system), Target.PLUGIN)
        instances = shared_questions(load_dataset(dataset), corpora, questions)
        model_path = resolve_model(model, console)
    except (SpecError, ModelNotFoundError, ValueError) as e:  # DatasetError is a ValueError
        fail(str(e))
    logs = fleet_logs(out)
    key = secrets.token_hex(16)
    try:
        with console.status(f"starting {workers} workers") as status:
            fleet = Fleet.start(model_path, workers, logs, api_key=key,
                                max_total_tokens=max_total_tokens,
                                serve_args=("--device", device, "--dtype", dtype))
            try:
                settings, rows = bench_fleet(fleet, instances, system, policy_list, new_tokens,
                                             concurrency, seed, on_step=status.update)
            finally:
                status.update("stopping the fleet")
                fleet.stop()
    except (FleetError, RuntimeError) as e:
        fail(f"{e} (logs in {logs})")
    console.print(
        f"{model}: {settings['corpora']} corpora x {questions} questions "
        f"(median corpus prefix {settings['corpus_prefix_tokens_median']:,.0f} tokens) over "
        f"{workers} workers, {settings['concurrency']} in flight, {new_tokens} decoded tokens "
        f"each, pools of {', '.join(f'{n:,}' for n in settings['pool_slots'])} slots; "
        f"ratios to full behind cache_aware; logs in {logs}", markup=False)
    _print_table(
        ("system", "policy", "builds/corpus", "hit rate", "workers", "slots held",
         "held/full", "TTFT s", "TTFT/full", "resent"),
        [(r.system, r.policy, f"{r.builds_per_corpus:.2f}", f"{r.hit_rate:.2f}",
          str(r.workers_used), f"{r.slots_held:,}", f"{r.held_vs_full:.2f}",
          f"{r.ttft_s_median:.2f}", f"{r.ttft_vs_full:.2f}", str(r.resent)) for r in rows])
    _write_rows(out, settings, rows)


@app.command("gpu")
def gpu_cmd(
    out: Annotated[Path, typer.Option(help="Report folder (gpu_check.json, the compare run).")
                   ] = Path("gpu_check"),
    device: Annotated[str, typer.Option(help=(
        "cuda or cuda:N; cpu rehearses every step (with --shape tiny) where there is no "
        "GPU."))] = "cuda",
    dtype: DtypeOption = "auto",
    shape: Annotated[str, typer.Option(help=(
        "Architecture of the random-weight model: llama3.1-8b, or tiny (same family, 2 "
        "layers, for a CPU)."))] = "llama3.1-8b",
    prompt_tokens: Annotated[int, typer.Option(
        min=200, help=("Approximate document tokens of the long prompt (--engine hf: its "
                       "exact length)."))] = 32000,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens decoded per request.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Requests per system; medians.")] = 3,
    compare_model: Annotated[str, typer.Option(
        help="Model (real weights) of the compare step: a packaged name or a dir.")
    ] = "smollm2",
    questions: Annotated[int, typer.Option(min=1, help="Demo questions of the compare step.")
                         ] = 8,
    load_requests: Annotated[int, typer.Option(
        min=2, help="Requests sent at once in the load step.")] = 12,
    engine: Annotated[str, typer.Option(help=(
        "sglang: the plugin in SGLang (needs kvrag[sglang]). hf: the HF engine and LoRA "
        "training, with nothing but PyTorch, transformers and PEFT."))] = "sglang",
    train_tokens: Annotated[int | None, typer.Option(min=200, help=(
        "--engine hf: prompt tokens of the SFT step with gradient checkpointing, where the "
        "compression-aware step starts halving (default: --prompt-tokens)."))] = None,
    memory_cap_gib: Annotated[float, typer.Option(min=1, help=(
        "--engine hf: the memory the compression-aware SFT step must fit in (the allocator "
        "is held to it on a larger card)."))] = 80.0,
) -> None:
    """Each engine at scale on one device: a random-weight Llama-3.1-8B-shaped model.

    Nothing is downloaded. --engine sglang: the checkpoint is a config plus tokenizer, and
    SGLang fills seeded random weights (load format 'dummy'). On a PROMPT_TOKENS prompt it
    measures triton with CUDA graphs (what an operator runs, the baseline), triton without
    them, and the kvrag backend over triton (which runs without): greedy tokens at ratio 0
    equal to triton's, KV slots freed and decode tokens/s at snapkv 0.5 and 0.9; sends
    LOAD_REQUESTS such prompts at once against a pool of 4 full ones (requests running at
    once, tokens/s, TTFT, TPOT against triton); then runs `kvrag compare --engine sglang`
    (full, snapkv:0.5) on QUESTIONS demo questions there.

    --engine hf: the model is built on the device (never in host memory first); a
    PROMPT_TOKENS prompt of random ids is answered by full, snapkv:0.0 (through the
    compressed path: it must give full's tokens), snapkv:0.5, snapkv:0.9 and
    snapkv[chunk=16;heads=shared]:0.5: KV bytes held, peak memory (CUDA allocator; on a CPU
    the process's resident high-water mark), prefill s, decode tok/s, as ratios to full;
    then one LoRA SFT step with gradient checkpointing at TRAIN_TOKENS and one
    compression-aware step at the longest length that fits in MEMORY_CAP_GIB. Writes
    gpu_hf.json and gpu_hf.md. Exits 1 if ratio 0 changes the tokens.
    """
    from kvrag.bench.gpu_check import SHAPES, GpuCheckSettings, run_gpu_check
    from kvrag.engines.device import resolve

    if engine not in ("sglang", "hf"):
        fail(f"--engine takes sglang or hf, got {engine!r}")
    if engine == "sglang":
        need("sglang", "kvrag bench gpu --engine sglang")
    try:
        placement = resolve(device, dtype)
        if shape not in SHAPES:
            raise ValueError(f"unknown --shape {shape!r}; use one of {', '.join(SHAPES)}")
    except ValueError as e:
        fail(str(e))
    if engine == "hf":
        _gpu_hf(placement, out, shape, prompt_tokens, new_tokens, repeats,
                train_tokens or prompt_tokens, memory_cap_gib)
        return
    try:
        resolve_model(compare_model, console)
        tokenizer_dir = resolve_model("smollm2", console)
    except (ModelNotFoundError, ValueError) as e:
        fail(str(e))
    settings = GpuCheckSettings(placement, shape, prompt_tokens, new_tokens, repeats,
                                compare_model, questions, load_requests)
    with console.status("GPU check") as status:
        try:
            report = run_gpu_check(settings, out, tokenizer_dir,
                                   on_step=lambda label: status.update(f"GPU check: {label}"))
        except RuntimeError as e:
            fail(str(e))
    from kvrag.bench.serving import ServingRow
    from kvrag.bench.serving_load import LoadRow

    console.print(f"{report['device']} ({report['dtype']}), SGLang {report['sglang']}: "
                  f"random {shape}, {report['prompt_tokens']}-token prompt, {new_tokens} "
                  f"decoded tokens, median of {repeats}; ratios to {report['base_backend']}",
                  markup=False)
    _print_serving([ServingRow(**row) for row in report["serving_rows"]])
    load = report["load"]
    console.print(f"under load: {load['requests']} requests at once, KV pool "
                  f"{load['pool_tokens']:,} tokens", markup=False)
    _print_load([LoadRow(**row) for row in report["load_rows"]])
    compare = report["compare"]
    console.print(f"compare ({compare['wall_s']:.0f} s): " + "; ".join(
        f"{name} SubEM {s['subem']:.2f}, KV tokens {s['kv_tokens_mean']:,.0f}"
        for name, s in compare["systems"].items()), markup=False)
    ok = report["checks"]["ratio0_same_tokens_as_inner"]
    console.print(f"ratio 0 gives the wrapped backend's tokens: {'yes' if ok else 'NO'}; "
                  f"report in {out / 'gpu_check.json'}", markup=False)
    if not ok:
        raise typer.Exit(1)


def _gpu_hf(placement, out: Path, shape: str, prompt_tokens: int, new_tokens: int,
            repeats: int, train_tokens: int, memory_cap_gib: float) -> None:
    from kvrag.bench.gpu_hf import HFCheckSettings, markdown, run_hf_check

    settings = HFCheckSettings(placement, shape, prompt_tokens, new_tokens, repeats,
                               train_tokens, memory_cap_gib)
    with console.status("GPU check (hf)") as status:
        try:
            report = run_hf_check(settings, out, on_step=lambda label: status.update(
                f"GPU check (hf): {label}"))
        except (RuntimeError, ValueError) as e:
            fail(str(e))
    console.print(markdown(report), markup=False, soft_wrap=True)
    console.print(f"report in {out / 'gpu_hf.json'} and {out / 'gpu_hf.md'}", markup=False)
    if not report["ratio0_same_tokens_as_full"]:
        raise typer.Exit(1)


@app.command("eviction")
def eviction_cmd(
    policies: Annotated[str, typer.Option(
        help="Comma-separated radix eviction policies, each NAME or NAME\\[key=value;...] "
             "with its --radix-eviction-policy-config options.")] = (
        "lru,lfu,slru,kvrag-cost,kvrag-cost[partial=false]"),
    workloads: Annotated[str, typer.Option(
        help="Comma-separated workloads: stationary, phases, bursts, system-prompt.")] = (
        "stationary,phases,bursts,system-prompt"),
    seeds: Annotated[int, typer.Option(min=1, help="Seeded traces per workload.")] = 3,
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
) -> None:
    """Recomputed prefill tokens and hit rate per eviction policy, on the same traces.

    A trace-driven simulation on SGLang's own radix cache (Python tree core) of
    long-context QA, one table per workload. stationary: 6 corpora of 2-4k tokens asked
    with Zipf popularity, a cache of 2.5. phases: the same, popularity redrawn twice.
    bursts: 12 corpora, about 10 questions in a row on each (LOFT-like). system-prompt: a
    1,024-token system prompt, then a document no other request sends.

    Each table has an `optimal` row: the fewest tokens any policy could recompute
    (Belady's MIN over tokens; exact when a node's tail may be evicted alone, a lower
    bound for SGLang's whole-node eviction), and every row's ratio to it and to lru.
    """
    need("sglang", "kvrag bench eviction")
    from kvrag.bench.eviction import parse_policy, run_eviction_benchmark, split_policies
    from kvrag.bench.eviction_traces import WORKLOADS

    names = split_policies(policies)
    chosen = [w.strip() for w in workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown or not chosen:
        fail(f"--workloads: unknown {', '.join(unknown) or '(none given)'}; choose from "
             f"{', '.join(WORKLOADS)}")
    if not names:
        fail("--policies: none given")
    try:
        for name in names:
            parse_policy(name)
    except ValueError as e:
        fail(f"--policies: {e}")
    results = []
    for title in chosen:
        workload = WORKLOADS[title]
        with console.status(f"replaying {title} traces"):
            try:
                rows = run_eviction_benchmark(names, tuple(range(seeds)), workload, title)
            except ValueError as e:
                fail(str(e))
        results.extend(rows)
        console.print(f"{title}: {workload.describe()}; seeds 0-{seeds - 1}", markup=False)
        _print_table(
            ("policy", "prompt tokens", "recomputed", "hit rate", "recomputed/lru",
             "recomputed/optimal"),
            [(r["policy"], f"{r['prompt_tokens']:,}", f"{r['recomputed']:,}",
              f"{r['hit_rate']:.1%}", _ratio(r["recomputed_vs_lru"]),
              _ratio(r["recomputed_vs_optimal"])) for r in rows])
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
