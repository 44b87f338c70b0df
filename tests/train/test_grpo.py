"""GRPO steps with each reward on the tiny checkpoint (short prompts, short completions)."""

from __future__ import annotations

import json

import pytest

from kvrag.train.examples import build_examples
from kvrag.train.formats import count_words
from kvrag.train.grpo import GRPOSettings, reward_for_trl, train_grpo
from kvrag.train.sft import LoraSettings

pytestmark = pytest.mark.slow


def test_trl_reward_scores_each_completion_against_its_own_case(small_instances):
    examples = build_examples(small_instances(2), "ids", 0, count_words)
    score = reward_for_trl("ao", examples)
    completions = [[{"role": "assistant", "content": "The answer is: Town 1"}],
                   [{"role": "assistant", "content": "The answer is: Town 2"}]]
    assert score(prompts=[None, None], completions=completions, example=[0, 1]) == [1.0, 0.0]
    judged: list[str] = []
    judge = reward_for_trl("judge", examples, judge=lambda q, c: judged.append(c) or 0.5)
    assert judge(prompts=[None], completions=completions[:1], example=[0]) == [0.75]
    assert judged == ["The answer is: Town 1"]


@pytest.mark.parametrize("reward", ["ao", "id", "id+c", "id+q", "judge"])
def test_a_grpo_step_runs_with_each_reward(reward, tiny_model_dir, tmp_path, small_instances):
    examples = build_examples(small_instances(2), "ids", 0, count_words)
    judged: list[str] = []

    def judge(question: str, completion: str) -> float:
        judged.append(completion)
        return 0.5

    cfg = GRPOSettings(reward=reward, steps=1, num_generations=2, batch_size=2,
                       max_completion_tokens=8, lora=LoraSettings(r=4, alpha=8))
    seen: list[tuple[int, float]] = []
    result = train_grpo(tiny_model_dir, examples, cfg, tmp_path / "adapter",
                        judge=judge if reward == "judge" else None,
                        on_step=lambda step, r: seen.append((step, r)))
    assert seen and seen[-1][0] == 1 and 0.0 <= seen[-1][1] <= 1.0
    assert len(result.per_step) == 1
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4
