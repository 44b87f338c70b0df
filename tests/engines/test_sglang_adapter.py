"""kvrag's SGLang engine adapter on the real SGLang engine (CPU, tiny checkpoint)."""

from __future__ import annotations

import pytest

from kvrag.compression import parse_spec
from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from kvrag.engines.sglang_engine import SGLangEngine

    engine = SGLangEngine(tiny_model_dir, max_total_tokens=4096)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt():
    docs = [Doc(f"d{i}", f"Doc {i}", f"Person {i} was born in city number {i}. " * 6)
            for i in range(8)]
    return build_prompt(Instance(id="q", question="Where was person 3 born?",
                                 answers=["city number 3"], docs=docs, gold_doc_ids=["d3"]))


def test_an_answer_cut_at_the_limit_is_marked_truncated(engine, prompt) -> None:
    gen = engine.generate(prompt, max_new_tokens=5)
    assert gen.truncated and gen.cost.new_tokens == 5
    squeezed = engine.generate(prompt, max_new_tokens=5, compression=parse_spec("snapkv:0.5"))
    assert squeezed.truncated and squeezed.cost.kv_tokens < gen.cost.kv_tokens
    # 2 (K and V) x 2 KV heads x head_dim 16 x 4 bytes (float32) x 2 layers
    assert gen.cost.kv_bytes == gen.cost.kv_tokens * 2 * 2 * 16 * 4 * 2


def test_an_answer_ended_by_a_stop_token_is_not(engine, prompt) -> None:
    out = engine.engine.generate(input_ids=engine.encode(prompt).input_ids,
                                 sampling_params={"max_new_tokens": 1, "temperature": 0.0})
    saved = engine.stop_ids
    engine.stop_ids = saved | {out["output_ids"][0]}  # the first answer token ends it
    try:
        gen = engine.generate(prompt, max_new_tokens=6)
    finally:
        engine.stop_ids = saved
    assert not gen.truncated and gen.cost.new_tokens == 0


def test_requests_in_flight_give_the_answers_one_at_a_time_gives(engine) -> None:
    prompts = []
    for q in range(6):
        docs = [Doc(f"d{i}", f"Doc {i}", f"Person {i} lives in town {i * q}. " * (3 + q))
                for i in range(6)]
        prompts.append(build_prompt(Instance(id=f"q{q}", question=f"Where does {q} live?",
                                             answers=["x"], docs=docs, gold_doc_ids=["d0"])))
    specs = [None, parse_spec("snapkv:0.5")]
    jobs = [((p, s), prompts[p], specs[s]) for p in range(6) for s in range(2)]
    one_by_one = {key: engine.generate(prompt, 6, spec) for key, prompt, spec in jobs}
    landed = list(engine.generate_many(iter(jobs), 6, concurrency=4))
    assert sorted(key for key, _ in landed) == sorted(one_by_one)
    for key, gen in landed:
        assert gen.text == one_by_one[key].text, key
        assert gen.cost.kv_tokens == one_by_one[key].cost.kv_tokens
