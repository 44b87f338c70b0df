"""Held-out validation in SFT: the split, scoring by the task metric, early stopping."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kvrag.evaluation.metrics import score
from kvrag.train.examples import build_examples
from kvrag.train.formats import count_words
from kvrag.train.sft import SFTConfig, train_sft, warmup_factor
from kvrag.train.validation import Validator, split_validation


def test_split_is_seeded_disjoint_and_sized(small_instances) -> None:
    instances = small_instances(10)
    train, held = split_validation(instances, 3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert not {i.id for i in train} & {i.id for i in held}
    assert split_validation(instances, 3, seed=0) == (train, held)
    assert split_validation(instances, 3, seed=1)[1] != held
    assert split_validation(instances, 0, seed=0) == (instances, [])
    with pytest.raises(ValueError, match="--val-size 10 leaves nothing to train on"):
        split_validation(instances, 10, seed=0)


def test_validator_scores_greedy_answers_by_the_task_metric(tiny_model_dir,
                                                            small_instances) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = build_examples(small_instances(2), "answer", 0, count_words)
    validator = Validator(tokenizer, examples, max_new_tokens=6)
    first, again = validator(model), validator(model)
    assert first == again  # greedy
    assert len(first.outputs) == 2 and all(first.outputs)
    expected = [score(ex.instance, out, ex.prompt)[1].subem
                for ex, out in zip(examples, first.outputs, strict=True)]
    assert first.score == pytest.approx(sum(expected) / 2)
    assert all(len(tokenizer(out, add_special_tokens=False)["input_ids"]) <= 6
               for out in first.outputs)


def test_warmup_rises_linearly_then_holds() -> None:
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, small_instances,
                                               tmp_path) -> None:
    """Scores 0.1, 0.3, 0.2, 0.2: two validations without beating 0.3 stop at step 4 of 6,
    and OUT holds step 2's adapter, not the last one."""
    examples = build_examples(small_instances(3), "ids", 0, count_words)
    scores = iter([0.1, 0.3, 0.2, 0.2, 0.9, 0.9])
    seen = []
    cfg = SFTConfig(steps=6, grad_accum=1, lr=5e-3, save_every=1, eval_every=1, patience=2)
    out = tmp_path / "adapter"
    result = train_sft(tiny_model_dir, examples, cfg, out, validate=lambda model: next(scores),
                       on_eval=lambda step, value: seen.append((step, value)))
    assert result.evals == seen == [(1, 0.1), (2, 0.3), (3, 0.2), (4, 0.2)]
    assert (result.steps, result.best_step, result.stopped_early) == (4, 2, True)
    kept = load_file(out / "adapter_model.safetensors")
    last = load_file(out / "checkpoint" / "adapter_model.safetensors")
    assert kept.keys() == last.keys()
    assert any(not torch.equal(kept[k], last[k]) for k in kept)
    assert all(torch.equal(kept[k], v)
               for k, v in load_file(out / "best" / "adapter_model.safetensors").items())
    again = train_sft(tiny_model_dir, examples, cfg, out, validate=lambda model: 1.0)
    assert (again.steps, again.resumed_from, again.best_step) == (4, 4, 2)  # done: nothing new


def test_validation_needs_a_validator_and_patience_needs_validation(tiny_model_dir,
                                                                     small_instances,
                                                                     tmp_path) -> None:
    examples = build_examples(small_instances(2), "ids", 0, count_words)
    with pytest.raises(ValueError, match="no validation examples"):
        train_sft(tiny_model_dir, examples, SFTConfig(steps=1, eval_every=1), tmp_path / "a")
    with pytest.raises(ValueError, match="--patience needs validation"):
        SFTConfig(patience=2)
