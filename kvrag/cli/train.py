"""``kvrag train``: LoRA adapters for in-context retrieval."""

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
    need,
)

app = typer.Typer(help="Fine-tune LoRA adapters (PEFT) for in-context retrieval.",
                  no_args_is_help=True)

ContextTokensOption = Annotated[int | None, typer.Option(
    min=100, help="Training prompts of about this many tokens: the demo split is generated "
                  "at this length; a dataset's instances drop non-gold documents until their "
                  "prompt fits. Evaluate at full length to measure transfer to longer "
                  "contexts.")]
PerTaskOption = Annotated[int | None, typer.Option(
    min=1, help="Demo split only: instances per task family (default 50).")]
CompressOption = Annotated[str | None, typer.Option(
    help="Compression-aware training, e.g. snapkv:0.5: the prompt's documents are "
         "compressed after its prefill and the model learns from that cache (SFT scores "
         "its targets there, GRPO samples and scores its completions there).")]


def _training_instances(dataset: str, tokenizer, context_tokens: int | None,
                        per_task: int | None, groups: str | None, limit: int | None) -> list:
    """The demo training split or a dataset, fitted to ``context_tokens``, then the chosen
    task groups and the first ``limit``."""
    from kvrag.data.demo import DEMO_PER_TASK
    from kvrag.data.loaders import load_dataset
    from kvrag.evaluation.prompt_fit import PromptLimit, fit_instances
    from kvrag.train.examples import demo_train_split, select_groups

    if per_task is not None and dataset != "demo":
        fail("--per-task sizes the demo split; a dataset is used as it is (see --limit)")
    if dataset == "demo":
        sizes = {"context_tokens": context_tokens} if context_tokens else {}
        instances = demo_train_split(**sizes, per_task=per_task or DEMO_PER_TASK)
    else:
        instances = load_dataset(dataset)
        if context_tokens:
            instances = fit_instances(instances, tokenizer, PromptLimit(
                context_tokens, "--context-tokens"), trim=True).instances
    instances = select_groups(instances, groups.split(",")) if groups else instances
    return instances[:limit] if limit else instances


@app.command("sft")
def sft_cmd(
    out: Annotated[Path, typer.Option(help="Adapter directory (a standard PEFT adapter).")],
    fmt: Annotated[str, typer.Option(
        "--format", help="Target: answer, ids, ids+quotes or ids+copy.")] = "answer",
    dataset: Annotated[str, typer.Option(
        help="A .jsonl dataset, or 'demo' for the demo training split (seed 1, disjoint "
             "from the evaluation suite).")] = "demo",
    model: Annotated[str, typer.Option(help="Packaged model name or checkpoint dir.")] = "smollm2",
    steps: Annotated[int | None, typer.Option(
        min=1, help="Optimizer steps (default 50, or what --epochs makes).")] = None,
    epochs: Annotated[float | None, typer.Option(
        min=0.0, help="Passes over the training examples, instead of --steps.")] = None,
    grad_accum: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 4,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 2e-4,
    warmup_steps: Annotated[int, typer.Option(
        min=0, help="Steps over which the learning rate rises linearly to --lr.")] = 0,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N instances.")] = None,
    context_tokens: ContextTokensOption = None,
    per_task: PerTaskOption = None,
    groups: Annotated[str | None, typer.Option(
        help="Train only on these comma-separated task groups (e.g. multiple_choice).")] = None,
    val_size: Annotated[int, typer.Option(
        min=0, help="Hold out this many training instances (seeded draw) and score the "
                    "adapter on them by the task metric (SubEM for qa).")] = 0,
    eval_every: Annotated[int | None, typer.Option(
        min=1, help="Steps between validation scores (default: 10 with --val-size). The "
                    "best-scoring adapter is the one written to OUT.")] = None,
    patience: Annotated[int, typer.Option(
        min=0, help="Stop after this many validations without a better score (0: "
                    "never).")] = 0,
    val_max_new_tokens: Annotated[int, typer.Option(
        min=1, help="Answer budget of a validation answer (compare's default).")] = 64,
    compress: CompressOption = None,
    seed: Annotated[int, typer.Option(help="Seed of document order and sampling.")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward to fit long prompts (default: on when "
             "a prompt is over 4096 tokens, except with --compress, which needs the KV "
             "cache that checkpointed layers drop).")] = None,
) -> None:
    """Supervised LoRA fine-tuning on the target only (prompt tokens masked).

    Rerunning the same command after an interruption resumes from OUT/checkpoint.
    """
    from transformers import AutoTokenizer

    from kvrag.compression import SpecError, parse_spec
    from kvrag.compression.capabilities import Target, check
    from kvrag.data.schema import DatasetError
    from kvrag.engines.device import DeviceError, resolve
    from kvrag.engines.models import ModelNotFoundError, resolve_model
    from kvrag.train.examples import build_examples
    from kvrag.train.formats import FORMATS, FormatError
    from kvrag.train.sft import (
        LoraSettings,
        SFTConfig,
        checkpointing_by_default,
        train_sft,
        training_steps,
    )
    from kvrag.train.validation import Validator, split_validation

    if fmt not in FORMATS:
        fail(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if (eval_every or patience) and not val_size:
        fail("--eval-every and --patience score held-out instances: give --val-size N")
    try:
        placement = resolve(device, dtype)
        if compress:
            check(parse_spec(compress), Target.TRAINING)
        model_path = resolve_model(model, console)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        instances = _training_instances(dataset, tokenizer, context_tokens, per_task, groups,
                                        limit)
        instances, held_out = split_validation(instances, val_size, seed)
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        examples = build_examples(instances, fmt, seed, count)
        validator = (Validator(tokenizer, build_examples(held_out, fmt, seed, count),
                               val_max_new_tokens) if held_out else None)
        if gradient_checkpointing is None:
            gradient_checkpointing = checkpointing_by_default(
                (count(ex.prompt.text) for ex in examples), compress)
        steps = training_steps(steps, epochs, len(examples), grad_accum)
        cfg = SFTConfig(fmt=fmt, steps=steps, grad_accum=grad_accum, lr=lr, seed=seed,
                        warmup_steps=warmup_steps,
                        eval_every=(eval_every or 10) if held_out else 0, patience=patience,
                        compress=compress, dtype=placement.dtype_name,
                        gradient_checkpointing=gradient_checkpointing,
                        lora=LoraSettings(r=rank, alpha=2 * rank))
    except (SpecError, DatasetError, ModelNotFoundError, FormatError, DeviceError,
            ValueError) as e:
        fail(str(e))
    validating = (f"; validation on {len(held_out)} held-out instances every "
                  f"{cfg.eval_every} steps" if held_out else "")
    console.print(f"SFT of {model} on {len(examples)} {dataset} examples, format {fmt}"
                  f"{f', compression-aware ({compress})' if compress else ''}: {steps} steps x "
                  f"{grad_accum} examples on {placement.device} in {placement.dtype_name}"
                  f"{', gradient checkpointing' if gradient_checkpointing else ''}{validating}",
                  markup=False)
    last = {"loss": "–", "val": "–"}

    def show(step: int) -> None:
        value = last["loss"] + (f" | val {last['val']}" if held_out else "")
        progress.update(step, value)

    def on_step(step: int, loss: float) -> None:
        last["loss"] = f"{loss:.3f}"
        show(step)

    def on_eval(step: int, value: float) -> None:
        last["val"] = f"{value:.3f}"
        show(step)

    with StepProgress("step", steps, "loss") as progress:
        try:
            result = train_sft(model_path, examples, cfg, out, device=placement.device,
                               on_step=on_step, on_eval=on_eval,
                               validate=(lambda m: validator(m).score) if validator else None)
        except ValueError as e:
            fail(str(e))
    console.print(f"Adapter in {result.adapter_dir} ({result.steps} steps"
                  f"{f', resumed at step {result.resumed_from}' if result.resumed_from else ''}"
                  f"{', stopped early' if result.stopped_early else ''}"
                  f", {result.seconds:.0f} s); loss {result.per_step[0]:.3f} -> "
                  f"{result.per_step[-1]:.3f}")
    if result.evals:
        scores = ", ".join(f"{step}: {value:.3f}" for step, value in result.evals)
        console.print(f"validation score by step: {scores}; kept the adapter of step "
                      f"{result.best_step}", markup=False)


@app.command("grpo")
def grpo_cmd(
    out: Annotated[Path, typer.Option(help="Adapter directory (a standard PEFT adapter).")],
    reward: Annotated[str, typer.Option(
        help="Reward: ao (answer), id (cited ids + answer), id+c (+ copied documents), "
             "id+q (+ quotes of <= 30 tokens), judge (a served judge model, shown the "
             "question, gold answer and cited documents, rates 0-100; plus answer; needs "
             "--judge-url).")] = "ao",
    dataset: Annotated[str, typer.Option(
        help="A .jsonl dataset, or 'demo' for the demo training split.")] = "demo",
    model: Annotated[str, typer.Option(help="Packaged model name or checkpoint dir.")] = "smollm2",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 20,
    generations: Annotated[int, typer.Option(min=2, help="Completions per prompt.")] = 4,
    batch_size: Annotated[int, typer.Option(
        min=2, help="Completions per step (a multiple of --generations).")] = 4,
    max_completion_tokens: Annotated[int, typer.Option(min=1, help="Completion length.")] = 48,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate.")] = 1e-5,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N instances.")] = None,
    groups: Annotated[str | None, typer.Option(
        help="Train only on these comma-separated task groups (e.g. multiple_choice).")] = None,
    context_tokens: ContextTokensOption = None,
    per_task: PerTaskOption = None,
    compress: CompressOption = None,
    seed: Annotated[int, typer.Option(help="Seed of document order and sampling.")] = 0,
    init_adapter: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False,
        help="Continue this LoRA adapter (e.g. an answer-format SFT one) instead of a new "
             "one. The answer rewards need the 'The answer is' marker, which a base model "
             "rarely writes: from scratch most groups score all 0 and give no gradient.")] = None,
    judge_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible API of the judge for --reward judge, e.g. "
             "http://127.0.0.1:30000/v1 from `kvrag serve`.")] = None,
    judge_model: Annotated[str | None, typer.Option(
        help="Model name to ask the judge server for (default: the first it lists).")] = None,
    judge_api_key: JudgeApiKeyOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """GRPO (TRL) with a LoRA adapter and a reward on the completion.

    Rerunning the same command after an interruption resumes from OUT/trainer.
    """
    from transformers import AutoTokenizer

    from kvrag.compression import SpecError, parse_spec
    from kvrag.compression.capabilities import Target, check
    from kvrag.data.schema import DatasetError
    from kvrag.engines.device import DeviceError, resolve
    from kvrag.engines.models import ModelNotFoundError, resolve_model
    from kvrag.evaluation.judge import ChatClient, Judge, JudgeUnavailableError
    from kvrag.train.examples import build_examples
    from kvrag.train.formats import FormatError
    from kvrag.train.grpo import GRPOSettings, train_grpo
    from kvrag.train.rewards import REWARDS
    from kvrag.train.sft import LoraSettings

    if reward not in REWARDS and reward != "judge":
        fail(f"unknown reward {reward!r}; use one of {', '.join(REWARDS)}, judge")
    if (reward == "judge") != (judge_url is not None):
        fail("--reward judge needs --judge-url, and --judge-url is only for --reward judge")
    need("train", "kvrag train grpo")
    try:
        placement = resolve(device, dtype)
        if compress:
            check(parse_spec(compress), Target.TRAINING)
    except (DeviceError, SpecError) as e:
        fail(str(e))
    judge = None
    if judge_url is not None:
        try:
            judge = Judge(ChatClient(judge_url, judge_model, api_key=judge_api_key))
        except JudgeUnavailableError as e:
            fail(str(e))
    try:
        model_path = resolve_model(model, console)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        instances = _training_instances(dataset, tokenizer, context_tokens, per_task, groups,
                                        limit)
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        # the citing rewards need gold ids: building "ids" targets checks that up front
        examples = build_examples(instances, "answer" if reward in ("ao", "judge") else "ids",
                                  seed, count)
    except (DatasetError, ModelNotFoundError, FormatError) as e:
        fail(str(e))
    cfg = GRPOSettings(reward=reward, steps=steps, num_generations=generations,
                       batch_size=batch_size, max_completion_tokens=max_completion_tokens,
                       lr=lr, seed=seed, dtype=placement.dtype_name, compress=compress,
                       lora=LoraSettings(r=rank, alpha=2 * rank),
                       init_adapter=str(init_adapter) if init_adapter else None)
    console.print(f"GRPO of {model} on {len(examples)} {dataset} prompts, reward {reward}"
                  f"{f', completions from the {compress} cache' if compress else ''}: "
                  f"{steps} steps x {batch_size} completions ({generations} per prompt)"
                  f"{f', from adapter {init_adapter}' if init_adapter else ''} on "
                  f"{placement.device} in {placement.dtype_name}", markup=False)
    with StepProgress("step", steps, "reward") as progress:
        try:
            result = train_grpo(model_path, examples, cfg, out, judge=judge, count_tokens=count,
                                device=placement.device,
                                on_step=lambda step, r: progress.update(step, f"{r:.3f}"))
        except (ValueError, JudgeUnavailableError) as e:
            fail(str(e))
    if judge is not None:
        console.print(f"Judge {judge.model}: {judge.calls} completions rated, "
                      f"{judge.unparsed} replies without a readable rating (scored 0)")
    console.print(f"Adapter in {result.adapter_dir} ({result.steps} steps, "
                  f"{result.seconds:.0f} s); mean reward per step: "
                  f"{', '.join(f'{r:.2f}' for r in result.per_step)}")


@app.command("merge")
def merge_cmd(
    adapter: Annotated[Path, typer.Option(help="A PEFT LoRA adapter directory.")],
    out: Annotated[Path, typer.Option(help="Where to write the merged checkpoint.")],
    model: Annotated[str, typer.Option(help="The adapter's base model.")] = "smollm2",
) -> None:
    """Merge an adapter into its base model: a plain checkpoint any engine (SGLang) loads."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvrag.engines.models import ModelNotFoundError, resolve_model

    if not (adapter / "adapter_config.json").exists():
        fail(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        model_path = resolve_model(model, console)
    except ModelNotFoundError as e:
        fail(str(e))
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    console.print(f"Merged {adapter} into {model}: {out}")
