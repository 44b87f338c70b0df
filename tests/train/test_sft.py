"""LoRA SFT on the tiny checkpoint: masking, a step that learns, resume, adapter round trip."""

from __future__ import annotations

import pytest
import torch

from kvrag.compression import parse_spec
from kvrag.train.examples import build_examples
from kvrag.train.formats import count_words
from kvrag.train.sft import (
    CHECKPOINTING_FROM_TOKENS,
    DEFAULT_STEPS,
    IGNORE,
    SFTConfig,
    checkpointing_by_default,
    encode_example,
    target_loss,
    train_sft,
    training_steps,
)


@pytest.fixture(scope="module")
def examples(small_instances):
    return build_examples(small_instances(3), "ids", seed=0, count_tokens=count_words)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _model(tiny_model_dir, adapter=None):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from kvrag.engines import hf_attention

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                attn_implementation=hf_attention.NAME)
    if adapter is not None:
        return PeftModel.from_pretrained(base, adapter)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                           task_type="CAUSAL_LM"))


def test_only_target_tokens_are_labelled(tokenizer, examples):
    item = encode_example(tokenizer, examples[0])
    target = tokenizer(examples[0].target + "<|im_end|>", add_special_tokens=False)["input_ids"]
    cut = item.prompt_len
    assert item.labels[:cut] == [IGNORE] * cut
    assert item.labels[cut:] == target == item.input_ids[cut:]
    assert item.span[0] < item.span[1] <= cut


def test_loss_is_the_targets_cross_entropy_alone(tiny_model_dir, tokenizer, examples):
    model = _model(tiny_model_dir)
    item = encode_example(tokenizer, examples[0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([item.input_ids])).logits[0]
        cut = item.prompt_len
        by_hand = torch.nn.functional.cross_entropy(
            logits[cut - 1:-1], torch.tensor(item.input_ids[cut:]))
        assert target_loss(model, item, None).item() == pytest.approx(by_hand.item(), rel=1e-5)
        everything = torch.nn.functional.cross_entropy(
            logits[:-1], torch.tensor(item.input_ids[1:]))
        assert by_hand.item() != pytest.approx(everything.item(), rel=1e-3)


def test_compressed_path_with_nothing_evicted_gives_the_plain_loss(
        tiny_model_dir, tokenizer, examples):
    # the targets run as one block over the gathered cache: wrong masking shows up here
    model = _model(tiny_model_dir)
    item = encode_example(tokenizer, examples[0])
    with torch.no_grad():
        plain = target_loss(model, item, None).item()
        assert target_loss(model, item, parse_spec("snapkv:0.0")).item() == pytest.approx(
            plain, rel=1e-5)


def test_compressed_loss_differs_and_trains_the_adapter(tiny_model_dir, tokenizer, examples):
    model = _model(tiny_model_dir)
    item = encode_example(tokenizer, examples[0])
    full = target_loss(model, item, None)
    compressed = target_loss(model, item, parse_spec("snapkv:0.9"))
    assert compressed.item() != pytest.approx(full.item(), rel=1e-6)
    compressed.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A starts 0-grad
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_one_step_lowers_the_loss_on_its_batch(tiny_model_dir, tokenizer, examples, tmp_path):
    cfg = SFTConfig(steps=1, grad_accum=len(examples), lr=5e-3, save_every=1)
    items = [encode_example(tokenizer, ex) for ex in examples]
    base = _model(tiny_model_dir)
    with torch.no_grad():
        before = sum(target_loss(base, it, None).item() for it in items) / len(items)
    result = train_sft(tiny_model_dir, examples, cfg, tmp_path / "adapter")
    trained = _model(tiny_model_dir, result.adapter_dir)
    with torch.no_grad():
        after = sum(target_loss(trained, it, None).item() for it in items) / len(items)
    assert result.per_step[0] == pytest.approx(before, rel=1e-4)  # the step saw this batch
    assert after < before
    assert (result.adapter_dir / "adapter_config.json").exists()


def test_interrupted_run_resumes_from_its_checkpoint(tiny_model_dir, examples, tmp_path):
    cfg = SFTConfig(steps=3, grad_accum=1, lr=1e-3, save_every=1)
    out = tmp_path / "adapter"
    full = train_sft(tiny_model_dir, examples, cfg, tmp_path / "uninterrupted")

    def stop_at_two(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sft(tiny_model_dir, examples, cfg, out, on_step=stop_at_two)
    resumed = train_sft(tiny_model_dir, examples, cfg, out)
    assert resumed.resumed_from == 1 and len(resumed.per_step) == 3
    assert resumed.per_step == pytest.approx(full.per_step, rel=1e-4)
    with pytest.raises(ValueError, match="other settings"):
        train_sft(tiny_model_dir, examples, SFTConfig(steps=3, grad_accum=1, lr=2e-3), out)


def test_adapter_round_trip_gives_identical_logits(tiny_model_dir, tokenizer, examples,
                                                   tmp_path):
    cfg = SFTConfig(steps=1, grad_accum=1, lr=1e-2)
    result = train_sft(tiny_model_dir, examples, cfg, tmp_path / "a")
    ids = torch.tensor([encode_example(tokenizer, examples[0]).input_ids])
    first = _model(tiny_model_dir, result.adapter_dir)
    second = _model(tiny_model_dir, result.adapter_dir)
    base = _model(tiny_model_dir)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (first, second, base))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # the adapter does change the model


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, tokenizer,
                                                                  examples):
    item = encode_example(tokenizer, examples[0])
    plain, checkpointed = _model(tiny_model_dir), _model(tiny_model_dir)
    checkpointed.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    results = []
    for model in (plain, checkpointed):
        model.train()
        loss = target_loss(model, item, None)
        loss.backward()
        results.append((loss.item(), _lora_grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert checkpointed.base_model.model.is_gradient_checkpointing
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_checkpointing_with_compression_aware_training_is_refused():
    with pytest.raises(ValueError, match="compression-aware"):
        SFTConfig(compress="snapkv:0.5", gradient_checkpointing=True)


def test_epochs_become_steps_of_grad_accum_examples():
    assert training_steps(None, 2.0, 10, 4) == 5  # 20 examples seen, 4 per step: 5 steps
    assert training_steps(7, 0.01, 10, 4) == 1  # epochs win over steps; at least one step
    assert training_steps(7, None, 10, 4) == 7
    assert training_steps(None, None, 10, 4) == DEFAULT_STEPS == 50


def test_checkpointing_is_on_by_default_only_for_long_prompts_without_compression():
    long = CHECKPOINTING_FROM_TOKENS + 1
    assert checkpointing_by_default([10, long], None)
    assert not checkpointing_by_default([10, CHECKPOINTING_FROM_TOKENS], None)
    assert not checkpointing_by_default([], None)
    assert not checkpointing_by_default([long], "snapkv:0.5")


def test_bfloat16_base_trains_a_float32_adapter(tiny_model_dir, examples, tmp_path):
    from safetensors.torch import load_file

    cfg32 = SFTConfig(steps=1, grad_accum=1, lr=1e-3)
    cfg16 = SFTConfig(steps=1, grad_accum=1, lr=1e-3, dtype="bfloat16",
                      gradient_checkpointing=True)
    full = train_sft(tiny_model_dir, examples, cfg32, tmp_path / "fp32")
    half = train_sft(tiny_model_dir, examples, cfg16, tmp_path / "bf16", device="cpu")
    # the same first batch, scored by a bfloat16 model: close, not equal
    assert half.per_step[0] == pytest.approx(full.per_step[0], rel=0.05)
    assert half.per_step[0] != full.per_step[0]
    weights = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
