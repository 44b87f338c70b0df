"""kvrag-cost inside the real SGLang engine on this CPU, under memory pressure.

A 2,048-token KV pool holds a corpus A asked three times, then a one-off prompt B; a
1,300-token request then needs more room than the tree's free and one-off parts. What
survives is read from the next requests' ``cached_tokens``. SGLang's strict memory
checks are on, so a slot that partial eviction leaked or freed twice fails the run.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.slow

CORPUS, ONE_OFF, PRESSURE, QUESTION = 800, 200, 1300, 20


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(200, 40000) for _ in range(n)]


A, B = _ids(1, CORPUS), _ids(2, ONE_OFF)


@pytest.fixture(scope="module")
def strict_memory_checks():
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY",
                    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"):
            mp.setenv(var, "1")
        yield


def survivors(model_dir, policy: str) -> dict[str, int]:
    """Prompt tokens of A and B still cached after the pressure request, under ``policy``."""
    import sglang

    engine = sglang.Engine(
        model_path=str(model_dir), device="cpu", attention_backend="torch_native",
        dtype="float32", disable_cuda_graph=True, disable_overlap_schedule=True,
        max_total_tokens=2048, mem_fraction_static=0.3, skip_tokenizer_init=True,
        radix_eviction_policy=policy, random_seed=0)
    params = {"max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True}

    def cached(ids: list[int]) -> int:
        out = engine.generate(input_ids=ids, sampling_params=params)
        return int(out["meta_info"]["cached_tokens"])

    try:
        for k in range(3):
            cached(A + _ids(10 + k, QUESTION))
        cached(B + _ids(20, QUESTION))
        cached(_ids(3, PRESSURE))
        return {"B": cached(B + _ids(22, QUESTION)), "A": cached(A + _ids(23, QUESTION))}
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def results(tiny_model_dir, strict_memory_checks) -> dict[str, dict[str, int]]:
    return {policy: survivors(tiny_model_dir, policy) for policy in ("kvrag-cost", "lru")}


def test_kvrag_cost_evicts_the_one_off_and_only_the_corpus_tail_it_needs(results) -> None:
    """B went (used once, although used after A); A lost only a tail, the rest matched."""
    kept = results["kvrag-cost"]
    assert kept["B"] == 0
    assert CORPUS // 2 < kept["A"] < CORPUS


def test_lru_in_the_same_engine_drops_the_older_corpus_whole(results) -> None:
    kept = results["lru"]
    assert kept["A"] == 0 and kept["B"] == ONE_OFF
