"""Held-out validation during training: greedy answers scored by the study's own metric.

The validation examples are instances kept out of training. The adapter being trained
answers each one greedily, as ``kvrag compare`` would, and the answer is scored with the
task's metric (SubEM for qa, accuracy for mc, ROUGE-L for sum), so early stopping
watches the number the study reports rather than the training loss.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrag.data.schema import Instance
from kvrag.engines.chat import encode_prompt, stop_ids
from kvrag.evaluation.metrics import TASK_METRICS, score
from kvrag.train.examples import Example


def split_validation(instances: Sequence[Instance], size: int,
                     seed: int) -> tuple[list[Instance], list[Instance]]:
    """(training, validation): ``size`` instances drawn by ``seed``, disjoint from the rest."""
    if size <= 0:
        return list(instances), []
    if size >= len(instances):
        raise ValueError(f"--val-size {size} leaves nothing to train on: the training set "
                         f"has {len(instances)} instances")
    held = set(random.Random(f"validation:{seed}").sample(range(len(instances)), size))
    return ([inst for i, inst in enumerate(instances) if i not in held],
            [inst for i, inst in enumerate(instances) if i in held])


@dataclass(frozen=True)
class Validation:
    score: float  # mean task metric over the examples
    outputs: list[str]


class Validator:
    """Scores a model on fixed examples; ``max_new_tokens`` as ``kvrag compare``'s budget."""

    def __init__(self, tokenizer, examples: Sequence[Example], max_new_tokens: int) -> None:
        if not examples:
            raise ValueError("no validation examples")
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.max_new_tokens = max_new_tokens
        self.prompts = [encode_prompt(tokenizer, ex.prompt).input_ids for ex in examples]

    @torch.inference_mode()
    def __call__(self, model) -> Validation:
        stops = sorted(stop_ids(self.tokenizer, model.generation_config.eos_token_id))
        outputs, scores = [], []
        for example, ids in zip(self.examples, self.prompts, strict=True):
            new = model.generate(
                input_ids=torch.tensor([ids], device=model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=stops,
                pad_token_id=stops[0])[0, len(ids):].tolist()
            truncated = len(new) >= self.max_new_tokens and new[-1] not in stops
            text = self.tokenizer.decode([t for t in new if t not in stops],
                                         skip_special_tokens=True)
            _, scores_ = score(example.instance, text, example.prompt, truncated)
            outputs.append(text)
            scores.append(getattr(scores_, TASK_METRICS[example.instance.task]) or 0.0)
        return Validation(sum(scores) / len(scores), outputs)
