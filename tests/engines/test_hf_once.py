"""Compress-once in the HF engine on the tiny Llama: one compressed corpus, many questions."""

import pytest
import torch

from kvrag.compression import kept_positions, parse_spec
from kvrag.data.loaders import load_dataset
from kvrag.data.prompt import build_prompt
from kvrag.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def corpus():
    """The first shared corpus of demo-shared: eight questions over the same documents."""
    instances = load_dataset("demo-shared")
    first = [i for i in instances if i.corpus_id == instances[0].corpus_id]
    assert len(first) == 8
    return [build_prompt(i) for i in first]


def fresh(engine: HFEngine) -> HFEngine:
    engine._once.clear()
    return engine


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "tova", "kvzip"])
def test_ratio_zero_once_answers_exactly_as_the_full_cache(engine, corpus, method) -> None:
    """The question extends the kept prefix at its logical positions: with nothing
    evicted that is the full prefill, token for token (pyramidkv extends token by token)."""
    for prompt in corpus[:2]:
        full = engine.generate(prompt, 8, ignore_eos=True)
        once = engine.generate(prompt, 8, parse_spec(f"once:{method}:0"), ignore_eos=True)
        assert once.text == full.text
        assert once.cost.kv_tokens == full.cost.kv_tokens


def test_the_second_question_prefills_only_its_own_tokens(engine, corpus) -> None:
    spec = parse_spec("once:snapkv:0.5")
    first = fresh(engine).generate(corpus[0], 4, spec)
    second = engine.generate(corpus[1], 4, spec)
    enc0, enc1 = engine.encode(corpus[0]), engine.encode(corpus[1])
    assert enc0.input_ids[:enc0.context_end] == enc1.input_ids[:enc1.context_end]
    assert first.cost.prefill_tokens == len(enc0.input_ids)
    assert first.cost.compress_s > 0
    assert second.cost.prefill_tokens == len(enc1.input_ids) - enc1.context_end
    assert second.cost.compress_s == 0
    n_doc = enc1.context_end - enc1.context_start
    kept_prefix = enc1.context_end - n_doc + spec.kept(n_doc)
    assert second.cost.shared_kv_tokens == kept_prefix
    assert second.cost.kv_tokens == kept_prefix + len(enc1.input_ids) - enc1.context_end


def test_the_kept_tokens_ignore_the_question(engine, corpus) -> None:
    """Question-agnostic: the corpus cache is what scoring the prefix alone keeps, whichever
    question built it."""
    spec = parse_spec("once:snapkv:0.5")
    fresh(engine).generate(corpus[2], 1, spec)
    (kept_a,) = [c.kept for c in engine._once.values()]
    fresh(engine).generate(corpus[5], 1, spec)
    (kept_b,) = [c.kept for c in engine._once.values()]
    for a, b in zip(kept_a, kept_b, strict=True):
        assert torch.equal(a, b)
    enc = engine.encode(corpus[2])
    pre = engine._prefill(enc.input_ids[:enc.context_end])
    layers = range(engine.n_layers)
    by_hand = kept_positions(spec, [pre.cache.layers[i].keys[0] for i in layers],
                             [pre.queries[i] for i in layers], enc.span)
    for a, b in zip(kept_a, by_hand, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", ["once:snapkv:0.5", "once:pyramidkv:0.5"])
def test_an_answer_does_not_depend_on_which_question_built_the_cache(engine, corpus,
                                                                     spec) -> None:
    compression = parse_spec(spec)
    alone = fresh(engine).generate(corpus[3], 8, compression, ignore_eos=True)
    fresh(engine).generate(corpus[0], 1, compression)
    after = engine.generate(corpus[3], 8, compression, ignore_eos=True)
    assert after.text == alone.text
    assert after.cost.prefill_tokens < alone.cost.prefill_tokens


def test_specs_share_nothing_and_a_new_corpus_drops_the_old(engine, corpus) -> None:
    fresh(engine)
    engine.generate(corpus[0], 1, parse_spec("once:snapkv:0.5"))
    engine.generate(corpus[0], 1, parse_spec("once:knorm:0.5"))
    assert len(engine._once) == 2
    other = build_prompt(load_dataset("demo-shared")[8])
    engine.generate(other, 1, parse_spec("once:snapkv:0.5"))
    assert len(engine._once) == 1


def test_full_and_per_question_costs_say_what_is_shareable(engine, corpus) -> None:
    enc = engine.encode(corpus[0])
    full = engine.generate(corpus[0], 1)
    per_question = engine.generate(corpus[0], 1, parse_spec("snapkv:0.5"))
    assert full.cost.shared_kv_tokens == enc.context_end
    assert per_question.cost.shared_kv_tokens == 0
    assert full.cost.prefill_tokens == per_question.cost.prefill_tokens == len(enc.input_ids)
