"""A ``kvrag compare`` run from its settings: checked before any work, then every system
on the same questions into OUT (or one sub-run per length of a sweep), resumed where an
earlier run stopped, and summarised."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rich.console import Console

from kvrag.data.demo import DEMO_PER_TASK, DEMO_SEED, SUBSETS, make_demo
from kvrag.data.loaders import fingerprint, load_corpus, load_dataset
from kvrag.data.prompt import prompt_version
from kvrag.data.schema import DatasetError, Instance
from kvrag.engines.device import DeviceError, Placement
from kvrag.engines.device import resolve as resolve_placement
from kvrag.engines.models import ModelNotFoundError, kvrag_home, resolve_model
from kvrag.engines.sglang_options import SGLangOptions, parse_sglang_args
from kvrag.engines.sglang_url import ServerUnavailableError
from kvrag.evaluation.engine_loading import (
    ENGINES,
    EngineChoiceError,
    default_concurrency,
    load_engine,
)
from kvrag.evaluation.judge import ChatClient, Judge, JudgeUnavailableError
from kvrag.evaluation.metrics import SCORING_VERSION, task_score
from kvrag.evaluation.prompt_fit import (
    Fitted,
    PromptTooLongError,
    fit_instances,
    fit_retrieved,
    prompt_limit,
)
from kvrag.evaluation.report import summarize, write_reports
from kvrag.evaluation.report_terminal import print_tables
from kvrag.evaluation.run_lock import RunLock, RunLockedError
from kvrag.evaluation.runner import pending, run_comparison
from kvrag.evaluation.store import ResultStore, StoreMismatchError
from kvrag.evaluation.systems import (
    CompressedContext,
    RagSystem,
    System,
    SystemOptions,
    SystemSpecError,
    parse_systems,
)
from kvrag.extras import MissingExtraError, require
from kvrag.rag_stack.config import RagConfig
from kvrag.rag_stack.embeddings import embedding_model_id
from kvrag.rag_stack.errors import (
    ChromaUnavailableError,
    EmbeddingModelNotFoundError,
    RagIndexError,
)
from kvrag.rag_stack.ingest_rate import IngestCounter


class ComparisonError(Exception):
    """A compare run that cannot start or go on; the message is the one line to show."""


class Progress(Protocol):
    def update(self, completed: int, value: str, description: str | None = None) -> None: ...


# (description, total, metric name) -> a live progress display
ProgressBar = Callable[[str, int, str], AbstractContextManager[Progress]]


@dataclass(frozen=True, kw_only=True)
class CompareSettings:
    """Every ``kvrag compare`` option, as given."""

    out: Path
    dataset: str
    systems: str
    model: str
    adapter: Path | None
    engine: str
    url: str | None
    api_key: str | None
    device: str
    dtype: str
    limit: int | None
    fmt: str
    max_new_tokens: int
    seed: int
    index_dir: Path | None
    chroma_url: str | None
    chunk_tokens: int
    embed_model: Path | None
    rag_order: str
    max_prompt_tokens: int | None
    concurrency: int | None
    context_length: int | None
    max_total_tokens: int | None
    mem_fraction_static: float | None
    tp_size: int | None
    sglang_args: list[str]
    judge_url: str | None
    judge_model: str | None
    judge_api_key: str | None
    context_tokens: str | None  # a sweep's lengths, comma-separated
    fit_context: bool
    questions_at_once: int | None = None  # KV per corpus: this many questions held together


def run_compare(s: CompareSettings, console: Console, progress: ProgressBar) -> None:
    """Check everything, then answer what OUT (each sweep length's OUT/len-N) does not hold
    yet and write the summaries; a sweep ends with its table and plot. Raises
    ``ComparisonError`` with the message to show."""
    if s.engine not in ENGINES:
        raise ComparisonError(f"unknown engine {s.engine!r}; available: {', '.join(ENGINES)}")
    if s.adapter is not None and not (s.adapter / "adapter_config.json").exists():
        raise ComparisonError(
            f"{s.adapter} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        placement = resolve_placement(s.device, s.dtype)
        sglang = SGLangOptions(s.context_length, s.max_total_tokens, s.mem_fraction_static,
                               s.tp_size, parse_sglang_args(s.sglang_args))
        if s.engine == "sglang":
            require("sglang", "--engine sglang")
            sglang.engine_kwargs()  # an unknown --sglang-arg fails now
        elif s.engine == "sglang-url" and sglang != SGLangOptions():
            raise ValueError("SGLang options are the server's: set them where it starts")
        elif sglang != SGLangOptions():
            raise ValueError("SGLang options (--context-length, --max-total-tokens, "
                             "--mem-fraction-static, --tp-size, --sglang-arg) need "
                             "--engine sglang")
        rag = RagConfig(index_dir=s.index_dir or kvrag_home() / "index",
                        chroma_url=s.chroma_url, chunk_tokens=s.chunk_tokens, order=s.rag_order,
                        embed_model=s.embed_model)
        options = SystemOptions(rag=rag)
        system_list = parse_systems(s.systems, options)
        lengths = parse_lengths(s.context_tokens) if s.context_tokens else []
        source_sha = (_demo_sha(max(lengths)) if lengths and s.dataset == "demo"
                      else fingerprint(s.dataset))
        if lengths and (s.max_prompt_tokens is not None or s.fit_context):
            raise ValueError("--context-tokens sets each sub-run's prompt limit and trims to "
                             "it; leave out --max-prompt-tokens and --fit-context")
        if lengths and s.dataset == "demo":
            instances = make_demo(context_tokens=max(lengths),
                                  per_task=(-(-s.limit // len(SUBSETS)) if s.limit
                                            else DEMO_PER_TASK))
        else:
            instances = load_dataset(s.dataset, s.fmt)
            options.corpus = load_corpus(s.dataset)
        model_path = resolve_model(s.model, console)
        judge = (Judge(ChatClient(s.judge_url, s.judge_model, api_key=s.judge_api_key))
                 if s.judge_url else None)
        if any(isinstance(system, RagSystem) for system in system_list):
            options.rag_pipeline()  # a bad --chroma-url fails now, before any work
        if (s.engine == "sglang-url") != (s.url is not None):
            raise ValueError("--url goes with --engine sglang-url, and it needs one")
        if s.url is not None:
            from kvrag.engines.sglang_url import check_servable, server_info

            info = server_info(s.url, s.api_key)
            for system in system_list:
                if isinstance(system, CompressedContext):
                    check_servable(s.url, info, system.spec)
    except (SystemSpecError, DatasetError, ModelNotFoundError, ChromaUnavailableError,
            EmbeddingModelNotFoundError, DeviceError, ServerUnavailableError, ValueError,
            JudgeUnavailableError, RagIndexError, MissingExtraError) as e:
        raise ComparisonError(str(e)) from e
    instances = instances[:s.limit] if s.limit else instances
    try:
        retrieving = [system for system in system_list if isinstance(system, RagSystem)]
        rag_only = (max(system.budget for system in retrieving)
                    if len(retrieving) == len(system_list) else None)
        fits = {n: _fit(instances, s.model, model_path, s.max_new_tokens, n, True, console,
                        rag_only)
                for n in lengths} or {None: _fit(instances, s.model, model_path,
                                                 s.max_new_tokens, s.max_prompt_tokens,
                                                 s.fit_context, console, rag_only)}
    except PromptTooLongError as e:
        raise ComparisonError(str(e)) from e
    run_config = {
        "model": s.model, "engine": s.engine, "dataset": s.dataset,
        "dataset_sha256": None, "max_new_tokens": s.max_new_tokens,
        "adapter": str(s.adapter.resolve()) if s.adapter is not None else None,
        "prompt_version": prompt_version(), "scoring_version": SCORING_VERSION,
        "chunk_tokens": s.chunk_tokens, "rag_order": s.rag_order,
        "embedding_model": embedding_model_id(s.embed_model),
        "rag_scope": "corpus" if options.corpus is not None else "question",
        "rag_index": s.chroma_url or str(rag.index_dir.resolve()),
        "max_prompt_tokens": s.max_prompt_tokens, "fit_context": s.fit_context,
        **placement.to_json(), "url": s.url,
        "judge_model": judge.model if judge is not None else None,
    }
    concurrency = (s.concurrency if s.concurrency is not None
                   else default_concurrency(s.engine, placement))
    plans = []
    for n, fitted in fits.items():
        config = run_config | {"dataset_sha256": source_sha if n is None
                               else hashlib.sha256(f"{source_sha}@{n}".encode()).hexdigest()}
        if n is not None:
            config |= {"context_tokens": n, "max_prompt_tokens": n, "fit_context": True}
        plans.append(_Plan(s.out if n is None else s.out / f"len-{n}", config, fitted,
                           system_list, model_path, s.adapter, placement, sglang, concurrency,
                           s.seed, s.api_key, judge, s.questions_at_once))
    shared = _SharedEngine(console)
    try:
        for plan in plans:
            try:
                with RunLock(plan.out):
                    _run(plan, shared, console, progress)
            except (RunLockedError, StoreMismatchError) as e:
                raise ComparisonError(str(e)) from e
    finally:
        shared.close()
    _show_sweep(s.out, lengths, s.seed, console)


def _show_sweep(out: Path, lengths: list[int], seed: int, console: Console) -> None:
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


def _fit(instances: list[Instance], model: str, model_path: Path, max_new_tokens: int,
         max_prompt_tokens: int | None, trim: bool, console: Console,
         rag_only: int | None = None) -> Fitted:
    """Every prompt measured against the model's context and ``max_prompt_tokens``; with
    ``rag_only`` (the largest budget, when every system retrieves) only the retrieval
    prompts, whose documents are at most that budget."""
    from transformers import AutoTokenizer

    limit = prompt_limit(model_path, model, max_new_tokens, max_prompt_tokens)
    if limit is None:
        return Fitted(list(instances), {})
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with console.status(f"Measuring {len(instances)} prompts..."):
        if rag_only is not None:
            return fit_retrieved(instances, tokenizer, limit, rag_only)
        return fit_instances(instances, tokenizer, limit, trim)


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
    questions_at_once: int | None


class _SharedEngine:
    """The engine, loaded when a run first has work and kept for a sweep's next sub-runs
    (an SGLang start costs minutes for a large model)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.engine = None

    def get(self, plan: _Plan):
        if self.engine is None:
            with self.console.status("Loading model..."):
                try:
                    self.engine = load_engine(plan.config["engine"], plan.model_path,
                                              plan.systems, plan.adapter, plan.placement,
                                              plan.sglang, plan.config["url"], plan.api_key)
                except EngineChoiceError as e:
                    raise ComparisonError(str(e)) from e
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None


def _ingest_shared_corpus(systems: list[System], tokenize: Callable[[str], list],
                          progress: ProgressBar, console: Console) -> None:
    """Store a dataset's shared corpus before the first question, with a progress bar, so
    a large one is ingested once and no question's time holds it."""
    retrieving = [system for system in systems if isinstance(system, RagSystem)]
    if not retrieving or retrieving[0].options.corpus is None:
        return
    options = retrieving[0].options
    corpus = options.corpus
    t0 = time.perf_counter()
    with progress("ingesting corpus documents", len(corpus), "chunks") as bar:
        counter = IngestCounter(bar.update)
        try:
            options.rag_pipeline().ensure(corpus, tokenize, counter)
        except RagIndexError as e:
            raise ComparisonError(str(e)) from e
    if counter.docs:
        console.print(f"Ingested the shared corpus ({len(corpus):,} documents, {counter.chunks:,} "
                      f"chunks) in {time.perf_counter() - t0:.1f} s, once for every question.")


def _run(plan: _Plan, shared: _SharedEngine, console: Console, progress: ProgressBar) -> None:
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
        _ingest_shared_corpus(system_list, eng.tokenize, progress, console)
        retried, resent = eng.retried_alone, getattr(eng, "resent", 0)
        with progress("answering", len(work), "score") as bar:
            answered: list[float | None] = []

            def on_answer(record: dict) -> None:
                answered.append(task_score(record))
                scored = [v for v in answered if v is not None]
                bar.update(len(answered),
                           f"{100 * sum(scored) / len(scored):.0f}%" if scored else "–",
                           description=record["system"])

            try:
                run_comparison(work, eng, store, max_new_tokens, on_answer,
                               plan.fitted.docs_dropped, plan.concurrency, plan.judge)
            except (RuntimeError, JudgeUnavailableError) as e:  # a refused or lost request
                raise ComparisonError(
                    f"{e}; the {len(store.records)} answers stored in {store.path} are kept "
                    "and a rerun resumes after them") from e
        if resent := getattr(eng, "resent", 0) - resent:
            console.print(f"{resent} requests were lost on their way (a worker gone, a stream "
                          "cut) and sent again; only their complete answers were stored.")
        if retried := eng.retried_alone - retried:
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
                        seed=plan.seed, at_once=plan.questions_at_once)
    write_reports(summary, out)
    print_tables(console, summary)
    console.print(f"Every column (SubEM, EM, F1, doc recall, KV per corpus...) is in "
                  f"{out / 'summary.md'}.", highlight=False)
    console.print(f"Results in {out}/ (results.jsonl, summary.json, summary.md, "
                  "accuracy_vs_kv.png)")
