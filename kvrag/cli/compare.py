"""``kvrag compare``: every system on the identical questions, scored with its cost."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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
from kvrag.compression import queries_needed
from kvrag.data.demo import DEMO_PER_TASK, DEMO_SEED, SUBSETS, make_demo
from kvrag.data.loaders import LOADERS, fingerprint, load_corpus, load_dataset
from kvrag.data.prompt import prompt_version
from kvrag.data.schema import DatasetError, Instance
from kvrag.engines.device import DeviceError, Placement
from kvrag.engines.device import resolve as resolve_placement
from kvrag.engines.models import ModelNotFoundError, kvrag_home, resolve_model
from kvrag.engines.sglang_options import SGLangOptions, parse_sglang_args
from kvrag.engines.sglang_url import ServerUnavailableError
from kvrag.evaluation.judge import ChatClient, Judge, JudgeUnavailableError
from kvrag.evaluation.metrics import SCORING_VERSION, task_score
from kvrag.evaluation.prompt_fit import Fitted, PromptTooLongError, fit_instances, prompt_limit
from kvrag.evaluation.report import summarize, write_reports
from kvrag.evaluation.run_lock import RunLock, RunLockedError
from kvrag.evaluation.runner import pending, run_comparison
from kvrag.evaluation.store import ResultStore, StoreMismatchError
from kvrag.evaluation.systems import (
    SYSTEM_HELP,
    CompressedContext,
    RagSystem,
    System,
    SystemOptions,
    SystemSpecError,
    parse_systems,
)
from kvrag.rag_stack.chroma import ChromaUnavailableError
from kvrag.rag_stack.embeddings import EmbeddingModelNotFoundError, embedding_model_id
from kvrag.rag_stack.pipeline import RagConfig
from kvrag.rag_stack.retrieve import ORDERS

ENGINES = ("hf", "sglang", "sglang-url")
# Measured on the 200 demo questions with SmolLM2 (README): its full-context answers end
# within 43 tokens or loop until any limit (4%).
DEFAULT_MAX_NEW_TOKENS = 64
SYSTEMS_HELP = (f"Comma-separated systems; known: {', '.join(SYSTEM_HELP.values())}. "
                "OPTIONS: [key=value;...], the method's settings (snapkv[window=32;kernel=7]) "
                "and chunk=C (keep whole chunks of C tokens) or chunk=sentence, and "
                "heads=shared (one kept set for all KV heads of a layer).")


def _load_engine(name: str, model_path: Path, systems: list[System], adapter: Path | None,
                 placement: Placement, sglang: SGLangOptions, url: str | None,
                 api_key: str | None):
    if name == "hf":
        from kvrag.engines.hf import HFEngine

        specs = [s.spec for s in systems if isinstance(s, CompressedContext)]
        return HFEngine(model_path, capture_queries=queries_needed(specs), adapter=adapter,
                        device=placement.device, dtype=placement.dtype)
    if adapter is not None:
        fail("--adapter runs on the hf engine; for sglang, merge it first with `kvrag train "
             "merge --adapter DIR --out CKPT` and pass --model CKPT")
    if name == "sglang-url":
        from kvrag.engines.sglang_url import SGLangURLEngine

        assert url is not None
        return SGLangURLEngine(url, model_path, api_key)
    if name == "sglang":
        from kvrag.engine_plugin.config import check_servable
        from kvrag.engines.sglang_engine import SGLangEngine

        specs = [s.spec for s in systems if isinstance(s, CompressedContext)]
        try:
            for spec in specs:
                check_servable(spec)
        except ValueError as e:
            fail(str(e))
        return SGLangEngine(model_path, capture_all=queries_needed(specs) is None,
                            device=placement.device, dtype=placement.dtype,
                            **sglang.engine_kwargs())
    fail(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")


def compare(
    out: Annotated[Path, typer.Option(help="Output directory (results.jsonl, summaries, plot).")],
    dataset: Annotated[
        str, typer.Option(help=("A .jsonl dataset path, 'demo' for the bundled suite, or "
                                "'demo-shared' for its shared-corpus version (10 corpora, "
                                "8 questions each)."))
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
    if engine not in ENGINES:
        fail(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        fail(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        placement = resolve_placement(device, dtype)
        sglang = SGLangOptions(context_length, max_total_tokens, mem_fraction_static, tp_size,
                               parse_sglang_args(sglang_arg or []))
        if engine == "sglang":
            sglang.engine_kwargs()  # an unknown --sglang-arg fails now
        elif engine == "sglang-url" and sglang != SGLangOptions():
            raise ValueError("SGLang options are the server's: set them where it starts")
        elif sglang != SGLangOptions():
            raise ValueError("SGLang options (--context-length, --max-total-tokens, "
                             "--mem-fraction-static, --tp-size, --sglang-arg) need "
                             "--engine sglang")
        rag = RagConfig(index_dir=index_dir or kvrag_home() / "index", chroma_url=chroma_url,
                        chunk_tokens=chunk_tokens, order=rag_order, embed_model=embed_model)
        options = SystemOptions(rag=rag)
        system_list = parse_systems(systems, options)
        lengths = parse_lengths(context_tokens) if context_tokens else []
        source_sha = (_demo_sha(max(lengths)) if lengths and dataset == "demo"
                      else fingerprint(dataset))
        if lengths and (max_prompt_tokens is not None or fit_context):
            raise ValueError("--context-tokens sets each sub-run's prompt limit and trims to "
                             "it; leave out --max-prompt-tokens and --fit-context")
        if lengths and dataset == "demo":
            instances = make_demo(context_tokens=max(lengths),
                                  per_task=-(-limit // len(SUBSETS)) if limit else DEMO_PER_TASK)
        else:
            instances = load_dataset(dataset, fmt)
            options.corpus = load_corpus(dataset)
        model_path = resolve_model(model, console)
        judge = (Judge(ChatClient(judge_url, judge_model, api_key=judge_api_key))
                 if judge_url else None)
        if any(isinstance(s, RagSystem) for s in system_list):
            options.rag_pipeline()  # a bad --chroma-url fails now, before any work
        if (engine == "sglang-url") != (url is not None):
            raise ValueError("--url goes with --engine sglang-url, and it needs one")
        if url is not None:
            from kvrag.engines.sglang_url import check_servable, server_info

            info = server_info(url, api_key)
            for s in system_list:
                if isinstance(s, CompressedContext):
                    check_servable(url, info, s.spec)
    except (SystemSpecError, DatasetError, ModelNotFoundError, ChromaUnavailableError,
            EmbeddingModelNotFoundError, DeviceError, ServerUnavailableError, ValueError,
            JudgeUnavailableError) as e:
        fail(str(e))
    instances = instances[:limit] if limit else instances
    try:
        fits = {n: _fit(instances, model, model_path, max_new_tokens, n, True)
                for n in lengths} or {None: _fit(instances, model, model_path, max_new_tokens,
                                                 max_prompt_tokens, fit_context)}
    except PromptTooLongError as e:
        fail(str(e))
    run_config = {
        "model": model, "engine": engine, "dataset": dataset,
        "dataset_sha256": None, "max_new_tokens": max_new_tokens,
        "adapter": str(adapter.resolve()) if adapter is not None else None,
        "prompt_version": prompt_version(), "scoring_version": SCORING_VERSION,
        "chunk_tokens": chunk_tokens, "rag_order": rag_order,
        "embedding_model": embedding_model_id(embed_model),
        "rag_scope": "corpus" if options.corpus is not None else "question",
        "rag_index": chroma_url or str(rag.index_dir.resolve()),
        "max_prompt_tokens": max_prompt_tokens, "fit_context": fit_context,
        **placement.to_json(), "url": url,
        "judge_model": judge.model if judge is not None else None,
    }
    if concurrency is None:
        concurrency = default_concurrency(engine, placement)
    plans = []
    for n, fitted in fits.items():
        config = run_config | {"dataset_sha256": source_sha if n is None
                               else hashlib.sha256(f"{source_sha}@{n}".encode()).hexdigest()}
        if n is not None:
            config |= {"context_tokens": n, "max_prompt_tokens": n, "fit_context": True}
        plans.append(_Plan(out if n is None else out / f"len-{n}", config, fitted, system_list,
                           model_path, adapter, placement, sglang, concurrency, seed, api_key,
                           judge))
    shared = _SharedEngine()
    try:
        for plan in plans:
            try:
                with RunLock(plan.out):
                    _run(plan, shared)
            except (RunLockedError, StoreMismatchError) as e:
                fail(str(e))
    finally:
        shared.close()
    _show_sweep(out, lengths, seed)


def _show_sweep(out: Path, lengths: list[int], seed: int) -> None:
    """A sweep's table and plot from its sub-runs (nothing for a single run)."""
    if not lengths:
        return
    from kvrag.evaluation.across_runs import load_run
    from kvrag.evaluation.length_sweep import PLOT_NAME, write_sweep

    text = write_sweep([load_run(out / f"len-{n}") for n in lengths], out / PLOT_NAME, seed)
    console.print(text, markup=False, highlight=False)
    console.print(f"Length sweep in {out}/ (sweep.md, {PLOT_NAME}; one compare run per "
                  "length in len-N/)")


def parse_lengths(text: str) -> list[int]:
    """``1000,2000,4000`` as sorted distinct lengths; each must be a positive integer."""
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--context-tokens takes comma-separated token counts such as "
                         f"1000,2000,4000, got {text!r}") from None
    if not lengths or lengths[0] < 1:
        raise ValueError(f"--context-tokens needs positive token counts, got {text!r}")
    return lengths


def _demo_sha(context_tokens: int) -> str:
    """What identifies the demo generated for a sweep (its first questions do not depend
    on how many are made, so neither does this). A sweep's sub-run adds its length; the
    model, also recorded, decides the cut."""
    recipe = {"demo": "make_demo", "seed": DEMO_SEED, "context_tokens": context_tokens,
              "demo_file_sha256": fingerprint("demo")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def default_concurrency(engine: str, placement: Placement) -> int:
    """Requests in flight when --concurrency is not given. On a CPU, SGLang's prefill is
    compute-bound and the plugin decodes each request on its own, so more in flight only
    interleaves the same work (measured: 16 demo questions x 2 systems took 298 s one at a
    time and 344 s eight at a time)."""
    if engine == "hf" or (engine == "sglang" and placement.device.type == "cpu"):
        return 1
    return 16


def _fit(instances: list[Instance], model: str, model_path: Path, max_new_tokens: int,
         max_prompt_tokens: int | None, trim: bool) -> Fitted:
    """Every prompt measured against the model's context and ``max_prompt_tokens``."""
    from transformers import AutoTokenizer

    limit = prompt_limit(model_path, model, max_new_tokens, max_prompt_tokens)
    if limit is None:
        return Fitted(list(instances), {})
    with console.status(f"Measuring {len(instances)} prompts..."):
        return fit_instances(instances, AutoTokenizer.from_pretrained(model_path), limit, trim)


@dataclass(frozen=True)
class _Plan:
    """A checked compare run, ready to start."""

    out: Path
    config: dict  # what run.json records
    fitted: Fitted  # the instances, trimmed where --fit-context had to
    systems: list[System]
    model_path: Path
    adapter: Path | None
    placement: Placement
    sglang: SGLangOptions
    concurrency: int
    seed: int
    api_key: str | None
    judge: Judge | None


class _SharedEngine:
    """The engine, loaded when a run first has work and kept for a sweep's next sub-runs
    (an SGLang start costs minutes for a large model)."""

    def __init__(self) -> None:
        self.engine = None

    def get(self, plan: _Plan):
        if self.engine is None:
            with console.status("Loading model..."):
                self.engine = _load_engine(plan.config["engine"], plan.model_path,
                                           plan.systems, plan.adapter, plan.placement,
                                           plan.sglang, plan.config["url"], plan.api_key)
        return self.engine

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        self.engine = None


def _run(plan: _Plan, shared: _SharedEngine) -> None:
    """Answer what ``out`` does not hold yet and write the summaries (under the run lock)."""
    out, instances, system_list = plan.out, plan.fitted.instances, plan.systems
    model, engine, dataset = (plan.config[k] for k in ("model", "engine", "dataset"))
    max_new_tokens, adapter = plan.config["max_new_tokens"], plan.adapter
    attempt = {"concurrency": plan.concurrency} | (
        {"sglang": plan.sglang.to_json()} if engine == "sglang" else {})
    store = ResultStore(out, plan.config, attempt)
    work = pending(instances, system_list, store)
    total = len(instances) * len(system_list)
    if work:
        console.print(f"{total - len(work)}/{total} answers already in {store.path}; "
                      f"running {len(work)} more with {model} on {engine}.")
        eng = shared.get(plan)
        retried = getattr(eng, "retried_alone", 0)
        with StepProgress("answering", len(work), "score") as progress:
            answered: list[float | None] = []

            def on_answer(record: dict) -> None:
                answered.append(task_score(record))
                scored = [v for v in answered if v is not None]
                progress.update(len(answered),
                                f"{100 * sum(scored) / len(scored):.0f}%" if scored else "–",
                                description=record["system"])

            try:
                run_comparison(work, eng, store, max_new_tokens, on_answer,
                               plan.fitted.docs_dropped, plan.concurrency, plan.judge)
            except (RuntimeError, JudgeUnavailableError) as e:  # a refused or lost request
                fail(f"{e}; the {len(store.records)} answers stored in {store.path} are kept "
                     "and a rerun resumes after them")
        if retried := getattr(eng, "retried_alone", 0) - retried:
            console.print(f"{retried} compressed requests found the KV pool too full "
                          "to compact and were asked again one at a time; a larger "
                          "--max-total-tokens or a lower --concurrency avoids that.")
        if plan.judge is not None:
            console.print(f"Judge {plan.judge.model}: {plan.judge.calls} outputs rated, "
                          f"{plan.judge.unparsed} replies without a readable rating.")
    else:
        console.print(f"All {total} answers are already in {store.path}; nothing to run.")
    label = model if adapter is None else f"{model} + adapter {adapter}"
    summary = summarize(store.records, [s.name for s in system_list],
                        [i.id for i in instances],
                        {"model": label, "engine": engine, "dataset": dataset,
                         "max_new_tokens": max_new_tokens, **plan.placement.to_json()},
                        seed=plan.seed)
    write_reports(summary, out)
    console.print((out / "summary.md").read_text(), markup=False, highlight=False)
    console.print(f"Results in {out}/ (results.jsonl, summary.json, summary.md, "
                  "accuracy_vs_kv.png)")
