"""GRPO with verifiable rewards (TRL's GRPOTrainer) and the same LoRA set-up as SFT.

Each prompt is the shared corpus-in-context chat prompt; TRL samples ``num_generations``
completions per prompt and scores each with one kvrag reward (``rewards.REWARDS``), which
sees the completion, its instance and the prompt (for the ``[DOC i]`` numbering).
TRL checkpoints every ``save_every`` steps under ``OUT/trainer``; a rerun resumes from the
last one. The adapter lands in ``OUT`` as a standard PEFT directory. With ``compress``
(compression-aware GRPO), completions are sampled and scored from each prompt's compressed
cache (``kvrag.train.compressed``), as SFT's ``compress`` scores its targets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvrag.engines.device import DTYPES
from kvrag.extras import require
from kvrag.train.examples import Example
from kvrag.train.formats import CountTokens, count_words
from kvrag.train.rewards import JudgeFn, get_reward
from kvrag.train.sft import LoraSettings, TrainResult


@dataclass
class GRPOSettings:
    reward: str = "ao"  # kvrag.train.rewards.REWARDS, or "judge"
    steps: int = 20
    num_generations: int = 4  # completions per prompt, compared with each other
    batch_size: int = 4  # completions per step; a multiple of num_generations
    max_completion_tokens: int = 48
    lr: float = 1e-5
    beta: float = 0.001  # KL weight (the study's setting)
    temperature: float = 1.0
    seed: int = 0
    save_every: int = 10
    dtype: str = "float32"  # of the base model; bfloat16/float16 also switch on TRL's autocast
    # e.g. "snapkv:0.5": sample and score completions from the compressed prompt cache
    compress: str | None = None
    # Re-runs each layer's forward in the backward. Without it, one step of 4 SmolLM2
    # completions over 2.5k-token prompts was killed for memory at 24 GB. None: on, except
    # with ``compress``, whose prefill needs the KV cache that checkpointed layers drop.
    gradient_checkpointing: bool | None = None
    # continue training this LoRA adapter (e.g. an SFT one that learned the answer format)
    # instead of a fresh one; the KL reference is then that adapter, as TRL does
    init_adapter: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = not self.compress
        if self.compress and self.gradient_checkpointing:
            raise ValueError("gradient checkpointing does not go with compression-aware GRPO "
                             "(its prefill needs the KV cache checkpointed layers drop)")


def reward_for_trl(name: str, examples: Sequence[Example], judge: JudgeFn | None = None,
                   count_tokens: CountTokens = count_words) -> Callable[..., list[float]]:
    """A TRL reward function: reads the ``example`` column to find each completion's case."""
    reward = get_reward(name, judge=judge, count_tokens=count_tokens)

    def score(prompts, completions, example, **kwargs) -> list[float]:
        out = []
        for completion, index in zip(completions, example, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            case = examples[index]
            out.append(reward(text, case.instance, case.prompt))
        return out

    score.__name__ = f"kvrag_{name}"
    return score


def train_grpo(
    model_path: Path, examples: Sequence[Example], cfg: GRPOSettings, out: Path,
    judge: JudgeFn | None = None, count_tokens: CountTokens = count_words,
    on_step: Callable[[int, float], None] = lambda step, reward: None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a LoRA adapter with GRPO into ``out``; ``on_step(step, mean reward)``."""
    require("train", "GRPO training")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig

    from kvrag.compression import parse_spec
    from kvrag.compression.capabilities import Target, check
    from kvrag.engines import hf_attention
    from kvrag.engines.chat import encode_prompt
    from kvrag.train.grpo_trainer import CompletionOnlyGRPOTrainer

    if cfg.batch_size % cfg.num_generations:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of num_generations "
                         f"{cfg.num_generations}")
    spec = parse_spec(cfg.compress) if cfg.compress else None
    if spec is not None:
        check(spec, Target.TRAINING)
    device = torch.device(device)
    if device.type == "cuda":
        # the Trainer (through Accelerate) trains on the current CUDA device
        torch.cuda.set_device(device)
    dataset = Dataset.from_list([{"prompt": ex.prompt.messages(), "example": i}
                                 for i, ex in enumerate(examples)])
    work = out / "trainer"
    args = GRPOConfig(
        output_dir=str(work), max_steps=cfg.steps,
        # one completion per forward and backward; a step accumulates batch_size of them
        per_device_train_batch_size=1, gradient_accumulation_steps=cfg.batch_size,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_tokens,
        learning_rate=cfg.lr, beta=cfg.beta, temperature=cfg.temperature, seed=cfg.seed,
        save_strategy="steps", save_steps=cfg.save_every, logging_steps=1, report_to="none",
        use_cpu=device.type == "cpu", disable_tqdm=True,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # stated either way: TRL's default is bf16 autocast, and a CPU without bf16
        # instructions runs every matmul of it through a slow fallback kernel
        bf16=cfg.dtype == "bfloat16", fp16=cfg.dtype == "float16",
    )

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                on_step(state.global_step, float(logs["reward"]))

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # kvrag's attention function records the queries compression scores with
    attention = {"attn_implementation": hf_attention.NAME} if spec is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.dtype], **attention)
    spans = {}
    if spec is not None:
        for ex in examples:
            enc = encode_prompt(tokenizer, ex.prompt)
            spans[tuple(enc.input_ids)] = enc.span
    peft_config = None
    if cfg.init_adapter:
        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    else:
        peft_config = cfg.lora.peft_config()
    trainer = CompletionOnlyGRPOTrainer(
        model=model, reward_funcs=reward_for_trl(cfg.reward, examples, judge, count_tokens),
        args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[Progress()], compress=spec, spans=spans,
    )
    resume = get_last_checkpoint(str(work)) if work.exists() else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    trainer.model.save_pretrained(out, selected_adapters=["default"])  # not TRL's "ref"
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    rewards = [float(log["reward"]) for log in trainer.state.log_history if "reward" in log]
    resumed = int(Path(resume).name.split("-")[-1]) if resume else 0
    return TrainResult(out, cfg.steps, resumed, time.perf_counter() - t0, rewards)
