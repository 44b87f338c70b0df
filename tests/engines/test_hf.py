import pytest
import torch

from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance
from kvrag.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt():
    inst = Instance(id="q", question="Where was Ann born?", answers=["Oslo"],
                    docs=[Doc("x", "Bob", "Bob was born in Rome."),
                          Doc("y", "Ann", "Ann was born in Oslo, a city.")],
                    gold_doc_ids=["y"])
    return build_prompt(inst)


def test_context_span_covers_exactly_the_documents(engine: HFEngine, prompt) -> None:
    enc = engine.encode(prompt)
    inside = engine.tokenizer.decode(enc.input_ids[enc.context_start:enc.context_end])
    assert inside.strip() == prompt.context.strip()
    before = engine.tokenizer.decode(enc.input_ids[: enc.context_start])
    assert before.endswith(prompt.header)
    after = engine.tokenizer.decode(enc.input_ids[enc.context_end:])
    assert after.startswith("Question:") and "<|im_start|>assistant" in after


def test_greedy_loop_matches_transformers_generate(engine: HFEngine, prompt) -> None:
    gen = engine.generate(prompt, max_new_tokens=12)
    ids = torch.tensor([engine.encode(prompt).input_ids])
    reference = engine.model.generate(ids, max_new_tokens=12, do_sample=False,
                                      eos_token_id=sorted(engine.stop_ids),
                                      pad_token_id=engine.tokenizer.eos_token_id)
    new = [t for t in reference[0, ids.shape[1]:].tolist() if t not in engine.stop_ids]
    assert gen.text == engine.tokenizer.decode(new, skip_special_tokens=True)
    assert gen.cost.new_tokens == len(new)


def test_cost_record(engine: HFEngine, prompt) -> None:
    gen = engine.generate(prompt, max_new_tokens=5)
    cost = gen.cost
    assert cost.prompt_tokens == len(engine.encode(prompt).input_ids)
    assert cost.kv_tokens == cost.prompt_tokens  # no compression: the whole prompt is cached
    # 2 (K and V) x 2 layers x 2 KV heads x head_dim 16 x 4 bytes (fp32)
    assert cost.kv_bytes == cost.kv_tokens * 2 * 2 * 2 * 16 * 4
    assert cost.prefill_s > 0 and cost.decode_s >= 0 and 0 <= cost.new_tokens <= 5
    assert cost.latency_s == pytest.approx(cost.prefill_s + cost.compress_s + cost.decode_s)
    assert cost.attended_tokens == cost.kv_tokens


def test_kvrag_attention_masks_like_sdpa(engine: HFEngine) -> None:
    """Several tokens over a cache, and a padded batch, give the unpadded one-pass logits."""
    model = engine.model
    ids = torch.randint(100, 2000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(input_ids=ids).logits[0]
        prefix = model(input_ids=ids[:, :30], use_cache=True)
        rest = model(input_ids=ids[:, 30:], past_key_values=prefix.past_key_values).logits[0]
        assert torch.allclose(rest, whole[30:], atol=1e-4)
        padded = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 40)], dim=1).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        left = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits[0]
        assert torch.allclose(left[5:], whole, atol=1e-4)


def test_truncated_says_whether_the_limit_or_a_stop_token_ended_it(engine: HFEngine,
                                                                   prompt) -> None:
    cut = engine.generate(prompt, max_new_tokens=6)
    assert cut.truncated and cut.cost.new_tokens == 6
    first = int(engine.model(torch.tensor([engine.encode(prompt).input_ids])).logits[0, -1]
                .argmax())
    saved = engine.stop_ids
    engine.stop_ids = saved | {first}  # the first answer token now ends the answer
    try:
        ended = engine.generate(prompt, max_new_tokens=6)
    finally:
        engine.stop_ids = saved
    assert not ended.truncated and ended.cost.new_tokens == 0
