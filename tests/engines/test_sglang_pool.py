"""An SGLang answer's KV figures are what SGLang's pool held (real engine, tiny model).

The check of "measured": with the radix cache flushed before each answer, the pool's
used slots at its first decode step, less the one slot that step's token took, are the
slots its prompt holds, and must equal the answer's ``kv_tokens``. The engine streams, so
the plugin's report reaches it in a streamed response.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from kvrag.compression import parse_spec
from kvrag.data.needles import NeedleConfig, make_needles
from kvrag.data.prompt import build_prompt
from kvrag.engine_plugin import config as plugin_config
from kvrag.engines.checkpoint import CheckpointSide

pytestmark = pytest.mark.slow

SYSTEMS = ["full", "snapkv:0.5", "pyramidkv:0.5", "snapkv[chunk=16;heads=shared]:0.5"]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from kvrag.engines.sglang_engine import SGLangEngine

    log = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY",
                    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"):
            mp.setenv(var, "1")
        with plugin_config.engine_environ({plugin_config.ENV_POOL_LOG: str(log)}):
            engine = SGLangEngine(tiny_model_dir, max_total_tokens=8192)
    yield engine, log
    engine.close()


def _flush(engine) -> None:
    """Empty the radix cache; SGLang refuses while the last request is still leaving."""
    for _ in range(200):
        if engine.engine.flush_cache().success:
            return
        time.sleep(0.05)
    raise AssertionError("SGLang did not flush its cache")


def _pool_lines(log) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_kv_tokens_are_the_slots_the_pool_lost(served, tiny_model_dir):
    engine, log = served
    questions = list(make_needles(NeedleConfig(context_tokens=600, corpora=2, needles=2)))[:2]
    # the arithmetic the measured bytes must agree with (the engine runs in float32)
    per_token = CheckpointSide.load(tiny_model_dir).kv.bytes_per_token(torch.float32)
    held: dict[str, list[float]] = {}
    for instance in questions:
        prompt = build_prompt(instance)
        for name in SYSTEMS:
            spec = None if name == "full" else parse_spec(name)
            _flush(engine)
            seen = len(_pool_lines(log))
            cost = engine.generate(prompt, max_new_tokens=3, compression=spec,
                                   ignore_eos=True).cost
            first_decode = _pool_lines(log)[seen]
            assert first_decode["running"] == 1
            assert cost.kv_tokens == first_decode["used"] - 1, name
            assert cost.kv_bytes == cost.kv_tokens * per_token, name
            held.setdefault(name, []).append(cost.kv_tokens)
            if name == "pyramidkv:0.5":
                # a slot holds every layer: the request holds its largest layer's count
                assert cost.layer_mean_kv_tokens < cost.kv_tokens
            else:
                assert cost.layer_mean_kv_tokens == cost.kv_tokens
    for name in SYSTEMS[1:]:
        assert all(c < f for c, f in zip(held[name], held["full"], strict=True)), name


def test_a_budget_over_the_documents_answers_from_the_full_cache(served):
    engine, _ = served
    prompt = build_prompt(next(make_needles(NeedleConfig(context_tokens=300, corpora=1))))
    full = engine.generate(prompt, max_new_tokens=4)
    over = engine.generate(prompt, max_new_tokens=4, compression=parse_spec("snapkv@100000"))
    assert over.cost.served_uncompressed and not full.cost.served_uncompressed
    assert (over.text, over.cost.kv_tokens) == (full.text, full.cost.kv_tokens)
