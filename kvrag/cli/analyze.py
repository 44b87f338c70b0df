"""``kvrag analyze``: how the model reads its in-context documents."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kvrag.cli.common import DeviceOption, DtypeOption, StepProgress, console, fail
from kvrag.data.loaders import LOADERS

if TYPE_CHECKING:
    from kvrag.data.schema import Instance
    from kvrag.engines.device import Placement
    from kvrag.evaluation.store import ResultStore

app = typer.Typer(help="Analyses of how the model reads its in-context documents.",
                  no_args_is_help=True)

BASE = "base"


@dataclass(frozen=True)
class Variant:
    label: str  # the name in the reports
    key: str  # what results.jsonl records it as: "base" or the adapter's resolved path
    adapter: Path | None


def variants(adapters: list[Path]) -> list[Variant]:
    """The base model, then each distinct adapter, labelled by its directory name (its
    path where two share a name)."""
    unique = list(dict.fromkeys(a.resolve() for a in adapters))
    names = [a.name for a in unique]
    out = [Variant(BASE, BASE, None)]
    for path, name in zip(unique, names, strict=True):
        label = name if names.count(name) == 1 and name != BASE else str(path)
        out.append(Variant(label, str(path), path))
    return out


@dataclass(frozen=True)
class _Plan:
    out: Path
    config: dict  # what run.json records: a rerun with other settings is refused
    instances: list[Instance]  # the questions with gold documents
    skipped: list[str]  # ids of those without
    variants: list[Variant]
    model_path: Path
    placement: Placement
    answer_tokens: int
    seed: int


@app.command("attention")
def attention_cmd(
    out: Annotated[Path, typer.Option(help=(
        "Output directory: attention.json, attention.md, ndcg_by_layer.png and the "
        "per-question results.jsonl a rerun resumes from."))],
    dataset: Annotated[str, typer.Option(help=(
        "A .jsonl dataset path, 'demo' for the bundled suite, or 'demo-shared'."))] = "demo",
    fmt: Annotated[str, typer.Option(
        "--format", help=f"Dataset format: auto, {', '.join(sorted(LOADERS))}.")] = "auto",
    model: Annotated[str, typer.Option(
        help="A packaged model name (smollm2) or a local HF checkpoint dir.")] = "smollm2",
    adapter: Annotated[list[Path] | None, typer.Option(help=(
        "A PEFT LoRA adapter directory, analysed besides the base model; repeatable."
    ))] = None,
    limit: Annotated[int | None, typer.Option(
        min=1, help="Use only the first N questions.")] = None,
    answer_tokens: Annotated[int, typer.Option(min=0, help=(
        "Gold-answer tokens appended (teacher-forced) whose attention counts with the "
        "question's."))] = 8,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
) -> None:
    """Rank each question's documents by the attention its question and answer tokens
    pay them, and score the ranking by NDCG@10 against the gold documents, per layer and
    over all layers, for the base model and each adapter."""
    from kvrag.data.loaders import fingerprint, load_dataset
    from kvrag.data.prompt import prompt_version
    from kvrag.data.schema import DatasetError
    from kvrag.engines.device import DeviceError, resolve
    from kvrag.engines.models import ModelNotFoundError, resolve_model
    from kvrag.evaluation.run_lock import RunLock, RunLockedError
    from kvrag.evaluation.store import StoreMismatchError

    for a in adapter or []:
        if not (a / "adapter_config.json").is_file():
            fail(f"{a} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        placement = resolve(device, dtype)
        instances = load_dataset(dataset, fmt)
        model_path = resolve_model(model, console)
    except (DatasetError, ModelNotFoundError, DeviceError) as e:
        fail(str(e))
    instances = instances[:limit] if limit else instances
    config = {"analysis": "attention", "model": model, "dataset": dataset,
              "dataset_sha256": fingerprint(dataset), "format": fmt,
              "answer_tokens": answer_tokens, "prompt_version": prompt_version(),
              "dtype": placement.dtype_name}
    plan = _Plan(out, config, [i for i in instances if i.gold_doc_ids],
                 [i.id for i in instances if not i.gold_doc_ids], variants(adapter or []),
                 model_path, placement, answer_tokens, seed)
    try:
        with RunLock(out, command="kvrag analyze attention"):
            _run(plan)
    except (RunLockedError, StoreMismatchError) as e:
        fail(str(e))


def _run(plan: _Plan) -> None:
    from kvrag.analysis.attention import (
        paired_delta,
        plot_ndcg_by_layer,
        render_markdown,
        summarize_variant,
    )
    from kvrag.evaluation.store import ResultStore

    store = ResultStore(plan.out, plan.config, {"device": str(plan.placement.device)})
    if plan.skipped:
        console.print(f"{len(plan.skipped)} questions have no gold documents; skipped.")
    for variant in plan.variants:
        done = {i for i, key in store.done() if key == variant.key}
        todo = [i for i in plan.instances if i.id not in done]
        if todo:
            _analyze(variant, todo, plan, store)
    ids = {i.id: n for n, i in enumerate(plan.instances)}
    summary = {"model": plan.config["model"], "dataset": plan.config["dataset"],
               "dtype": plan.config["dtype"], "answer_tokens": plan.answer_tokens,
               "questions": len(plan.instances) + len(plan.skipped),
               "skipped_no_gold": len(plan.skipped), "skipped_ids": plan.skipped,
               "variants": {}}
    base: list[dict] = []
    for variant in plan.variants:
        records = sorted((r for r in store.records
                          if r["system"] == variant.key and r["id"] in ids),
                         key=lambda r: ids[r["id"]])
        summary["variants"][variant.label] = {
            "adapter": str(variant.adapter) if variant.adapter else None,
            **summarize_variant(records, plan.seed)}
        if variant.adapter is None:
            base = records
        else:
            summary["variants"][variant.label]["vs_base"] = paired_delta(records, base,
                                                                         plan.seed)
    (plan.out / "attention.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = render_markdown(summary)
    (plan.out / "attention.md").write_text(text)
    plot_ndcg_by_layer(summary, plan.out / "ndcg_by_layer.png")
    console.print(text, markup=False, highlight=False)
    console.print(f"Results in {plan.out}/ (attention.json, attention.md, "
                  "ndcg_by_layer.png, results.jsonl)")


def _analyze(variant: Variant, todo: list[Instance], plan: _Plan, store: ResultStore) -> None:
    """Analyse ``todo`` with ``variant``, appending each question's record to ``store``."""
    import torch

    from kvrag.analysis.attention import analyze_instance
    from kvrag.engines.hf import HFEngine

    try:
        with console.status(f"Loading {variant.label}..."):
            engine = HFEngine(plan.model_path, dtype=plan.placement.dtype,
                              adapter=variant.adapter, device=plan.placement.device)
    except (OSError, ValueError, RuntimeError) as e:
        what = f"adapter {variant.adapter}" if variant.adapter else f"model {plan.model_path}"
        fail(f"cannot load {what}: {e}")
    scores: list[float] = []
    with StepProgress(variant.label, len(todo), "NDCG@10") as progress:
        for instance in todo:
            try:
                record = analyze_instance(engine.model, engine.tokenizer, instance,
                                          plan.answer_tokens)
            except torch.OutOfMemoryError:
                fail(f"out of memory on {instance.id}; the {len(store.records)} results in "
                     f"{store.path} are kept and a rerun resumes after them")
            store.append({"system": variant.key, "variant": variant.label, **record})
            scores.append(record["ndcg"])
            progress.update(len(scores), f"{sum(scores) / len(scores):.3f}")
    del engine
    if plan.placement.device.type == "cuda":
        torch.cuda.empty_cache()
