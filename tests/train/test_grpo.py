"""GRPO steps with each reward on the tiny checkpoint (short prompts, short completions)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from kvrag.train.examples import build_examples
from kvrag.train.formats import count_words
from kvrag.train.grpo import GRPOSettings, reward_for_trl, train_grpo
from kvrag.train.sft import LoraSettings

pytestmark = [pytest.mark.slow, pytest.mark.trl]


def test_trl_reward_scores_each_completion_against_its_own_case(small_instances):
    examples = build_examples(small_instances(2), "ids", 0, count_words)
    score = reward_for_trl("ao", examples)
    completions = [[{"role": "assistant", "content": "The answer is: Town 1"}],
                   [{"role": "assistant", "content": "The answer is: Town 2"}]]
    assert score(prompts=[None, None], completions=completions, example=[0, 1]) == [1.0, 0.0]
    judged: list[str] = []
    judge = reward_for_trl("judge", examples, judge=lambda case: judged.append(case.output) or 0.5)
    assert judge(prompts=[None], completions=completions[:1], example=[0]) == [0.75]
    assert judged == ["The answer is: Town 1"]


@pytest.mark.parametrize("reward", ["ao", "id", "id+c", "id+q", "judge"])
def test_a_grpo_step_runs_with_each_reward(reward, tiny_model_dir, tmp_path, small_instances):
    examples = build_examples(small_instances(2), "ids", 0, count_words)
    judged: list[str] = []

    def judge(case) -> float:
        judged.append(case.output)
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


def test_completion_only_scoring_matches_trl(tiny_model_dir, tmp_path):
    """The CPU override's log-probs and entropies equal TRL's fused LM head's, padding included."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from kvrag.train.grpo_trainer import CompletionOnlyGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                      temperature=0.7, use_cpu=True, report_to="none", gradient_checkpointing=False)
    trainer = CompletionOnlyGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        train_dataset=Dataset.from_list([{"prompt": "a b c"}] * 2),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 100, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # a left-padded prompt
    attention_mask[2, -2:] = 0  # a completion that ended early
    completion = 5
    ours = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, completion, compute_entropy=True)
    trl = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, input_ids, attention_mask, completion, compute_entropy=True)
    scored = attention_mask[:, -completion:].bool()
    assert ours[0].shape == trl[0].shape == (3, completion)
    torch.testing.assert_close(ours[0][scored], trl[0][scored], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1][scored], trl[1][scored], atol=1e-5, rtol=1e-5)
    assert (ours[0][scored] < 0).all()


def test_grpo_continues_a_given_adapter(tiny_model_dir, tmp_path, small_instances, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    init = tmp_path / "sft"
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    start.save_pretrained(init)
    before = {k: v.clone() for k, v in start.state_dict().items() if "lora_" in k}
    examples = build_examples(small_instances(2), "answer", 0, count_words)
    cfg = GRPOSettings(reward="ao", steps=1, num_generations=2, batch_size=2,
                       max_completion_tokens=8, lr=1e-2, init_adapter=str(init))
    # the tiny model never writes the answer marker, so every real reward is 0 and gives no
    # gradient; this one differs between the two completions of a group
    rewards = itertools.cycle([0.0, 1.0])
    monkeypatch.setattr("kvrag.train.grpo.get_reward",
                        lambda name, **kw: lambda completion, instance, prompt: next(rewards))
    result = train_grpo(tiny_model_dir, examples, cfg, tmp_path / "grpo")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 2  # the given adapter's set-up, not GRPOSettings.lora's
    assert not (result.adapter_dir / "ref").exists()
    after = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      result.adapter_dir).state_dict()
    assert before.keys() == {k for k in after if "lora_" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained from there


def test_grpo_trains_a_bfloat16_base_with_autocast(tiny_model_dir, tmp_path, small_instances,
                                                   monkeypatch):
    from safetensors.torch import load_file
    from trl import GRPOTrainer

    seen = {}
    real_train = GRPOTrainer.train

    def train(self, *args, **kwargs):
        seen.update(bf16=self.args.bf16, base=self.model.get_base_model().dtype,
                    cpu=self.args.use_cpu)
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "train", train)
    examples = build_examples(small_instances(2), "answer", 0, count_words)
    cfg = GRPOSettings(reward="ao", steps=1, num_generations=2, batch_size=2,
                       max_completion_tokens=8, dtype="bfloat16", lora=LoraSettings(r=4, alpha=8))
    result = train_grpo(tiny_model_dir, examples, cfg, tmp_path / "grpo", device="cpu")
    assert seen == {"bf16": True, "base": torch.bfloat16, "cpu": True}
    assert len(result.per_step) == 1
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())


def test_compressed_grpo_samples_and_scores_from_the_compressed_cache(
        tiny_model_dir, tmp_path, small_instances, monkeypatch):
    import kvrag.train.compressed as compressed

    prefills: list[int] = []
    real = compressed.compressed_prefill

    def counting(model, prompt_ids, *args):
        prefills.append(prompt_ids.shape[1])
        return real(model, prompt_ids, *args)

    monkeypatch.setattr(compressed, "compressed_prefill", counting)
    sampled: list[str] = []
    rewards = itertools.cycle([0.0, 1.0])

    def reward(completion, instance, prompt):
        sampled.append(completion)
        return next(rewards)

    monkeypatch.setattr("kvrag.train.grpo.get_reward", lambda name, **kw: reward)
    examples = build_examples(small_instances(2), "answer", 0, count_words)
    cfg = GRPOSettings(reward="ao", steps=1, num_generations=2, batch_size=2,
                       max_completion_tokens=6, compress="snapkv:0.5",
                       lora=LoraSettings(r=4, alpha=8))
    assert cfg.gradient_checkpointing is False  # the compressed prefill needs the KV cache
    result = train_grpo(tiny_model_dir, examples, cfg, tmp_path / "grpo")
    assert len(result.per_step) == 1 and len(sampled) == 2
    # per step, each group's prompt is prefilled once to sample its completions and once to
    # score them all under the reference (the KL, beta > 0); the policy's loss then scores
    # one completion per micro-batch, each from its own prefill
    assert cfg.beta > 0
    groups = cfg.batch_size // cfg.num_generations
    assert len(prefills) == cfg.steps * (2 * groups + cfg.batch_size)
    assert len(set(prefills)) == 1
    saved = json.loads((result.adapter_dir / "train_config.json").read_text())
    assert saved["compress"] == "snapkv:0.5"


def test_compressed_scoring_with_nothing_evicted_is_trls(tiny_model_dir, tmp_path,
                                                       small_instances):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from kvrag.compression import parse_spec
    from kvrag.engines import hf_attention
    from kvrag.engines.chat import encode_prompt
    from kvrag.train.grpo_trainer import CompletionOnlyGRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = build_examples(small_instances(1), "answer", 0, count_words)[0]
    enc = encode_prompt(tokenizer, example.prompt)

    def trainer(spec: str) -> CompletionOnlyGRPOTrainer:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                     attn_implementation=hf_attention.NAME)
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2,
                          num_generations=2, use_cpu=True, report_to="none",
                          gradient_checkpointing=False)
        return CompletionOnlyGRPOTrainer(
            model=model, args=args, reward_funcs=lambda completions, **kw: [0.0] * 2,
            train_dataset=Dataset.from_list([{"prompt": example.prompt.messages()}] * 2),
            processing_class=tokenizer, peft_config=LoraConfig(r=4, lora_alpha=8,
                                                               task_type="CAUSAL_LM"),
            compress=parse_spec(spec), spans={tuple(enc.input_ids): enc.span})

    completion = torch.tensor([[11, 12, 13, 14], [21, 22, 0, 0]])
    prompt = torch.tensor([enc.input_ids] * 2)
    input_ids = torch.cat([prompt, completion], 1)
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0  # a completion that ended early
    scored = mask[:, -4:].bool()
    kept_all = trainer("snapkv:0.0")
    ours = kept_all._get_per_token_logps_and_entropies(kept_all.model, input_ids, mask, 4,
                                                       compute_entropy=True)
    trl = GRPOTrainer._get_per_token_logps_and_entropies(kept_all, kept_all.model, input_ids,
                                                         mask, 4, compute_entropy=True)
    torch.testing.assert_close(ours[0][scored], trl[0][scored], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1][scored], trl[1][scored], atol=1e-4, rtol=1e-4)
    half = trainer("snapkv:0.9")
    evicted = half._get_per_token_logps_and_entropies(half.model, input_ids, mask, 4)[0]
    assert (evicted[scored] - ours[0][scored]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="differ from kvrag's encoding"):
        half._get_per_token_logps_and_entropies(half.model, input_ids[:, 1:], mask[:, 1:], 4)


def test_compressed_grpo_refuses_checkpointing_and_untrainable_specs():
    with pytest.raises(ValueError, match="gradient checkpointing"):
        GRPOSettings(compress="snapkv:0.5", gradient_checkpointing=True)
    assert GRPOSettings().gradient_checkpointing is True
