"""LoRA supervised fine-tuning on corpus-in-context prompts, loss on the target only.

Reads top to bottom: encode examples (prompt tokens masked out of the loss), wrap the
model with a PEFT LoRA adapter, then a plain loop of gradient-accumulated AdamW steps,
checkpointing so an interrupted run resumes at its last saved step. The base model is
loaded in ``dtype`` on the given device; PEFT keeps the adapter's own weights in float32,
and the loss is taken in float32. With ``compress``,
every example's prompt cache is compressed by the shared method code before the target
is scored (compression-aware training): the adapter learns to answer from what a
compressed server keeps, and gradients reach the prompt through the kept entries.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvrag.compression import CompressionSpec, parse_spec
from kvrag.engines.chat import END_OF_TURN, encode_prompt
from kvrag.engines.device import DTYPES
from kvrag.train.examples import Example

IGNORE = -100  # label of tokens left out of the loss
DEFAULT_STEPS = 50  # optimizer steps when neither steps nor epochs are given


@dataclass
class LoraSettings:
    r: int = 16  # adapter rank
    alpha: int = 32  # scale alpha / r
    dropout: float = 0.05
    # every attention and MLP projection of a Llama-style block
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj")

    def peft_config(self):
        """These settings as PEFT's ``LoraConfig`` for a causal LM."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM")


@dataclass
class SFTConfig:
    fmt: str = "answer"  # target format (kvrag.train.formats.FORMATS)
    steps: int = DEFAULT_STEPS  # optimizer steps
    grad_accum: int = 4  # examples per step (one at a time: prompts are long)
    lr: float = 2e-4
    seed: int = 0
    save_every: int = 10  # steps between checkpoints
    warmup_steps: int = 0  # the learning rate rises linearly to ``lr`` over these steps
    eval_every: int = 0  # steps between validation scores (0: no validation)
    patience: int = 0  # validations without a better score before stopping (0: never)
    compress: str | None = None  # e.g. "snapkv:0.5": compression-aware training
    dtype: str = "float32"  # of the base model (kvrag.engines.device.DTYPES)
    # Re-run each layer's forward in the backward instead of keeping its activations: what
    # lets a 32k-token prompt train on one GPU. Not with ``compress``: the compressed
    # prefill needs the layers' KV cache, which checkpointed layers do not return.
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.patience and not self.eval_every:
            raise ValueError("--patience needs validation: give --val-size and --eval-every")
        if self.compress and self.gradient_checkpointing:
            raise ValueError("gradient checkpointing does not go with compression-aware "
                             "training (its prefill needs the KV cache checkpointed layers "
                             "drop); train without --compress, or without checkpointing")


# prompts longer than this train with gradient checkpointing unless told otherwise
CHECKPOINTING_FROM_TOKENS = 4096


def training_steps(steps: int | None, epochs: float | None, examples: int,
                   grad_accum: int) -> int:
    """The optimizer steps to run: enough for ``epochs`` passes over ``examples`` when
    given (at least one), else ``steps``, else ``DEFAULT_STEPS``."""
    if epochs is not None:
        return max(1, math.ceil(epochs * examples / grad_accum))
    return steps or DEFAULT_STEPS


def checkpointing_by_default(prompt_tokens: Iterable[int], compress: str | None) -> bool:
    """Gradient checkpointing when it is not chosen: on when a prompt is over
    ``CHECKPOINTING_FROM_TOKENS``, never with compression-aware training."""
    return not compress and max(prompt_tokens, default=0) > CHECKPOINTING_FROM_TOKENS


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens
    span: tuple[int, int]  # the documents' tokens (what compression may evict)

    @property
    def prompt_len(self) -> int:
        return next(i for i, label in enumerate(self.labels) if label != IGNORE)


def encode_example(tokenizer, example: Example) -> Encoded:
    """Chat-templated prompt + target + end of turn; only the target is learned."""
    enc = encode_prompt(tokenizer, example.prompt)
    target = tokenizer(example.target + END_OF_TURN, add_special_tokens=False)["input_ids"]
    return Encoded(enc.input_ids + target, [IGNORE] * len(enc.input_ids) + target, enc.span)


def target_loss(model, item: Encoded, spec: CompressionSpec | None,
                tokenizer=None) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, from a full or a compressed prompt cache."""
    device = model.device
    ids = torch.tensor([item.input_ids], device=device)
    labels = torch.tensor([item.labels], device=device)
    cut = item.prompt_len
    if spec is None:
        # logits of the last prompt position and the target only: a long prompt's full
        # [tokens, vocab] logits would dominate memory and time
        out = model(input_ids=ids, logits_to_keep=ids.shape[1] - cut + 1)
        return torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), labels[0, cut:])
    from kvrag.train.compressed import continuation_logits

    logits = continuation_logits(model, ids[:, :cut], ids[:, cut:], item.span, spec, tokenizer)
    return torch.nn.functional.cross_entropy(logits[0].float(), labels[0, cut:])

@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    resumed_from: int
    seconds: float
    per_step: list[float]  # training loss per step (SFT), or mean reward per step (GRPO)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, validation score)
    best_step: int | None = None  # the step whose adapter was kept (with validation)
    stopped_early: bool = False


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the learning rate at 0-based ``step``: linear warm-up, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def train_sft(
    model_path: Path, examples: Sequence[Example], cfg: SFTConfig, out: Path,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    device: str | torch.device = "cpu",
    validate: Callable[[torch.nn.Module], float] | None = None,
    on_eval: Callable[[int, float], None] = lambda step, score: None,
) -> TrainResult:
    """Train a LoRA adapter into ``out`` (a standard PEFT directory); resumes from
    ``out/checkpoint`` when an earlier run with the same config was interrupted (on any
    device: only ``cfg`` has to match).

    With ``validate`` (a model's held-out score, higher is better) every
    ``cfg.eval_every`` steps, the best-scoring adapter is kept in ``out/best`` and is the
    one written to ``out``; ``cfg.patience`` validations without a better score stop the
    run early."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvrag.engines import hf_attention

    spec = parse_spec(cfg.compress) if cfg.compress else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items = [encode_example(tokenizer, ex) for ex in examples]
    if not items:
        raise ValueError("no training examples")
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.dtype],
                                                attn_implementation=hf_attention.NAME)
    base.to(device)
    if cfg.gradient_checkpointing:
        # non-reentrant: the frozen embeddings' output needs no requires_grad for it
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint = out / "checkpoint"
    state = _load_state(checkpoint, cfg)
    if state is not None:
        model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
    else:
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, cfg.lora.peft_config())
    model.train()
    if cfg.eval_every and validate is None:
        raise ValueError("eval_every is set but there are no validation examples")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_factor(step, cfg.warmup_steps))
    start, losses, evals = 0, [], []
    if state is not None:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
        start, losses = state["step"], state["losses"]
        evals = [tuple(e) for e in state["evals"]]
    best = out / "best"
    # one fixed order per epoch, the same on a resumed run
    order = [i for epoch in range(cfg.steps * cfg.grad_accum // len(items) + 1)
             for i in random.Random(cfg.seed + epoch).sample(range(len(items)), len(items))]
    t0 = time.perf_counter()
    step = start
    while step < cfg.steps and not _patience_spent(evals, cfg.patience):
        optimizer.zero_grad()
        total = 0.0
        for k in range(cfg.grad_accum):
            loss = target_loss(model, items[order[step * cfg.grad_accum + k]], spec, tokenizer)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(total)
        on_step(step, total)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            model.eval()
            value = validate(model)
            model.train()
            if not evals or value > max(v for _, v in evals):
                _save_whole(model.save_pretrained, best)
            evals.append((step, value))
            on_eval(step, value)
        if step % cfg.save_every == 0 or step == cfg.steps \
                or _patience_spent(evals, cfg.patience):
            _save_state(model, optimizer, scheduler, checkpoint, cfg, step, losses, evals)
    if evals:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(best / name, out / name)
    else:
        model.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    best_step = max(evals, key=lambda e: e[1])[0] if evals else None
    return TrainResult(out, step, start, time.perf_counter() - t0, losses, evals, best_step,
                       stopped_early=step < cfg.steps)


def _patience_spent(evals: list[tuple[int, float]], patience: int) -> bool:
    """``patience`` validations in a row without beating the best before them."""
    if not patience or len(evals) <= patience:
        return False
    scores = [v for _, v in evals]
    return max(scores[-patience:]) <= max(scores[:-patience])


def _save_whole(save: Callable[[Path], None], path: Path) -> None:
    """Write a directory with ``save`` so that it is complete or absent, never half."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _save_state(model, optimizer, scheduler, checkpoint: Path, cfg: SFTConfig, step: int,
                losses: list[float], evals: list[tuple[int, float]]) -> None:
    """Adapter, optimizer, schedule, step and validation scores, written whole or not at all."""
    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "losses": losses, "evals": evals, "config": asdict(cfg)}))

    _save_whole(save, checkpoint)


def _load_state(checkpoint: Path, cfg: SFTConfig) -> dict | None:
    path = checkpoint / "state.json"
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if state["config"] != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(f"{checkpoint} was saved by a run with other settings; use another "
                         "--out or the same settings to resume")
    return state
