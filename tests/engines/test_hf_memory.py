"""What the HF engine holds: bytes read from its cache tensors, and no second full copy."""

from __future__ import annotations

import gc

import pytest
import torch

from kvrag.compression import parse_spec
from kvrag.data.needles import NeedleConfig, make_needles
from kvrag.data.prompt import build_prompt
from kvrag.engines.checkpoint import CheckpointSide
from kvrag.engines.hf import HFEngine
from kvrag.evaluation.runner import run_comparison
from kvrag.evaluation.store import ResultStore
from kvrag.evaluation.systems import SystemOptions, parse_systems

KV_HEADS, HEAD_DIM = 2, 16  # the tiny model's


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def questions():
    return list(make_needles(NeedleConfig(context_tokens=400, corpora=1, needles=2)))


def live_kv_bytes() -> int:
    """Storage bytes of every live tensor shaped like a KV cache layer, each storage once."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if (type(obj) is torch.Tensor and obj.dim() == 4 and obj.shape[1] == KV_HEADS
                and obj.shape[-1] == HEAD_DIM):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("system", ["full", "snapkv:0.5", "streamingllm:0.25",
                                    "snapkv[chunk=16;heads=shared]:0.5"])
def test_kv_bytes_are_read_from_the_tensors_and_agree_with_the_arithmetic(
        engine, questions, tiny_model_dir, system):
    per_token = CheckpointSide.load(tiny_model_dir).kv.bytes_per_token(torch.float32)
    spec = None if system == "full" else parse_spec(system)
    cost = engine.generate(build_prompt(questions[0]), 4, compression=spec).cost
    assert cost.kv_bytes == cost.kv_tokens * per_token
    assert cost.layer_mean_kv_tokens == cost.kv_tokens and cost.peak_bytes is None
    engine.release()


def test_a_full_answer_decodes_over_the_shared_prefill_without_a_copy(engine, questions):
    prompt = build_prompt(questions[0])
    n = len(engine.encode(prompt).input_ids)
    one_copy = n * 2 * 2 * KV_HEADS * HEAD_DIM * 4  # K and V, 2 layers, float32
    seen: list[int] = []
    hook = engine.model.register_forward_pre_hook(lambda *_: seen.append(live_kv_bytes()))
    try:
        engine.generate(prompt, 3, ignore_eos=True)  # a prefill, then two decode steps
    finally:
        hook.remove()
    assert len(seen) == 3
    # while decoding: the prefill's cache, growing a token at a time, and nothing else
    # (a layer being extended is briefly held twice)
    assert max(seen[1:]) <= one_copy + one_copy // 2
    # the next system over the same prefill does not see full's decoded tokens
    snap = engine.generate(prompt, 8, compression=parse_spec("snapkv:0.5"))
    engine.release()
    assert engine.generate(prompt, 8, compression=parse_spec("snapkv:0.5")).text == snap.text
    engine.release()


def test_a_comparison_drops_each_question_prefill_once_its_systems_are_served(
        engine, questions, tmp_path):
    systems = parse_systems("full,snapkv:0.5", SystemOptions())
    store = ResultStore(tmp_path, {"test": True})
    held: list[int] = []
    run_comparison([(q, s) for q in questions[:2] for s in systems], engine, store, 4,
                   on_answer=lambda record: held.append(live_kv_bytes()))
    # after each question's last system nothing is held; after its first, its prefill is
    assert held[0] > 0 and held[1] == 0 and held[3] == 0
    assert engine._last is None


def test_a_budget_over_the_documents_answers_from_the_full_cache(engine, questions):
    prompt = build_prompt(questions[0])
    full = engine.generate(prompt, 8)
    over = engine.generate(prompt, 8, compression=parse_spec("snapkv@100000"))
    engine.release()
    assert over.cost.served_uncompressed and not full.cost.served_uncompressed
    assert (over.text, over.cost.kv_tokens) == (full.text, full.cost.kv_tokens)
