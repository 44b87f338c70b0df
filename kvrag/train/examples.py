"""Training examples: the shared corpus-in-context prompt plus a target in one format.

Each instance's docs are reshuffled with an RNG seeded by (seed, instance id), so the gold
docs land among the distractors at a position that does not depend on the dataset's own
order, nor on where the instance sits in the list.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvrag.data.demo import DEMO_CONTEXT_TOKENS, DEMO_PATH, DEMO_PER_TASK, DEMO_SEED, make_demo
from kvrag.data.prompt import Prompt, build_prompt
from kvrag.data.schema import DatasetError, Instance, read_jsonl
from kvrag.train.formats import CountTokens, build_target

DEMO_TRAIN_SEED = 1  # the frozen evaluation split is seed 0 (DEMO_SEED)


@dataclass(frozen=True)
class Example:
    """One supervised example; ``instance`` is kept so rewards can score completions."""

    id: str
    prompt: Prompt
    target: str
    instance: Instance


def build_examples(
    instances: Sequence[Instance], fmt: str, seed: int, count_tokens: CountTokens
) -> list[Example]:
    """One Example per instance; ``count_tokens`` caps quotes (pass the model's tokenizer)."""
    examples = []
    for inst in instances:
        docs = list(inst.docs)
        random.Random(f"{seed}:{inst.id}").shuffle(docs)
        placed = list(enumerate(docs, start=1))
        target = build_target(fmt, inst, placed, count_tokens)
        examples.append(Example(inst.id, build_prompt(inst, placed), target, inst))
    return examples


def demo_train_split(
    seed: int = DEMO_TRAIN_SEED, context_tokens: int = DEMO_CONTEXT_TOKENS,
    per_task: int = DEMO_PER_TASK, eval_instances: Sequence[Instance] | None = None,
) -> list[Instance]:
    """The demo generator under another seed, minus any question seen in the eval split.

    ``make_demo`` draws names from finite pools, so another seed can repeat a question
    (e.g. the same firm and quarter); such instances are dropped, whether the question is
    in ``eval_instances`` (default: the frozen demo suite) or earlier in this split. The
    split can therefore hold slightly fewer than ``4 * per_task`` instances.
    """
    if seed == DEMO_SEED:
        raise ValueError(f"seed {seed} is the evaluation split's seed; pick another one")
    held_out = read_jsonl(DEMO_PATH) if eval_instances is None else eval_instances
    seen_questions = {inst.question for inst in held_out}
    eval_ids = {inst.id for inst in held_out}
    split = []
    for inst in make_demo(seed, context_tokens, per_task):
        if inst.question in seen_questions or inst.id in eval_ids:
            continue
        seen_questions.add(inst.question)
        split.append(inst)
    return split


def select_groups(instances: Sequence[Instance], groups: Sequence[str]) -> list[Instance]:
    """The instances of the named groups (task families, e.g. ``multiple_choice``)."""
    present = sorted({inst.group for inst in instances})
    unknown = [g for g in groups if g not in present]
    if unknown:
        raise DatasetError(f"no instances of group(s) {', '.join(unknown)}; this dataset has "
                         f"{', '.join(present)}")
    return [inst for inst in instances if inst.group in groups]
