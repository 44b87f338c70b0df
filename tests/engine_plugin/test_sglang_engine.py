"""The plugin inside the real SGLang engine on this CPU (tiny checkpoint).

One torch_native engine gives reference outputs and is shut down; then one engine with
``--attention-backend kvrag`` serves every test here. SGLang's own strict memory checks
are on in both, so a slot leaked or freed twice by the compaction fails the run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CONTEXT = 1000  # tokens of the shared-prefix prompts
MAX_NEW = 6


def _engine(model_dir, backend: str, **extra):
    import sglang

    return sglang.Engine(
        model_path=str(model_dir), device="cpu", attention_backend=backend, dtype="float32",
        disable_cuda_graph=True, disable_overlap_schedule=True, max_total_tokens=8192,
        mem_fraction_static=0.3, skip_tokenizer_init=True, random_seed=0, **extra,
    )


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(200, 40000) for _ in range(n)]


PREFIX = _ids(1, CONTEXT - 40)
PROMPTS = {
    "plain": _ids(2, CONTEXT),
    "shared_a": PREFIX + _ids(3, 40),
    "shared_b": PREFIX + _ids(4, 40),
}


def _params(compression: str | None = None, span=None) -> dict:
    params: dict = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}
    custom = {}
    if compression is not None:
        custom["kvrag_compression"] = compression
    if span is not None:
        custom["kvrag_span"] = list(span)
    if custom:
        params["custom_params"] = custom
    return params


def _generate(engine, ids, params) -> tuple[list[int], list[float], str]:
    out = engine.generate(input_ids=ids, sampling_params=params, return_logprob=True)
    logprobs = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    return out["output_ids"], logprobs, out["meta_info"]["id"]


@pytest.fixture(scope="module", autouse=True)
def strict_memory_checks(monkeypatch_module):
    for var in ("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY",
                "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"):
        monkeypatch_module.setenv(var, "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def reference(tiny_model_dir, strict_memory_checks):
    """torch_native outputs of every prompt, each on a fresh engine's empty radix tree."""
    engine = _engine(tiny_model_dir, "torch_native")
    try:
        outputs = {}
        for name, ids in PROMPTS.items():
            outputs[name] = _generate(engine, ids, _params())
            engine.flush_cache()
        return outputs
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("plugin") / "stats.jsonl"
    monkeypatch_module.setenv("KVRAG_PLUGIN_STATS", str(path))
    monkeypatch_module.setenv("KVRAG_PLUGIN_RECORD_KEPT", "1")
    return path


@pytest.fixture(scope="module")
def engine(tiny_model_dir, reference, stats_path):
    # chunks of 256 tokens, so a 1,000-token prompt is prefilled in four
    engine = _engine(tiny_model_dir, "kvrag", chunked_prefill_size=256)
    yield engine
    engine.shutdown()


def _stats(path, rid: str) -> dict | None:
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return next((line for line in lines if line["rid"] == rid), None)


def test_ratio_zero_reproduces_torch_native_exactly(engine, reference, stats_path):
    engine.flush_cache()
    ids, logprobs, rid = _generate(engine, PROMPTS["plain"], _params("snapkv:0.0"))
    ref_ids, ref_logprobs, _ = reference["plain"]
    assert ids == ref_ids
    assert logprobs == pytest.approx(ref_logprobs, abs=1e-5)
    record = _stats(stats_path, rid)
    assert record is not None and record["keep"] == [CONTEXT, CONTEXT]  # the path really ran


def test_snapkv_half_returns_half_the_context_slots(engine, stats_path):
    engine.flush_cache()
    ids, _, rid = _generate(engine, PROMPTS["plain"], _params("snapkv:0.5"))
    assert len(ids) == MAX_NEW
    record = _stats(stats_path, rid)
    assert record is not None
    evictable = CONTEXT - 64  # default span: all but the protected tail
    kept = evictable - round(evictable * 0.5) + 64
    assert record["keep"] == [kept, kept] and record["protected"] == 0
    assert record["freed"] == CONTEXT - kept == record["free_after"] - record["free_before"]
    assert 0.4 < record["freed"] / CONTEXT < 0.6


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from kvrag.engines.hf import HFEngine

    return HFEngine(tiny_model_dir)


@pytest.mark.parametrize("spec", ["snapkv:0.5", "snapkv[chunk=16]:0.5",
                                  "pyramidkv[heads=shared]:0.5", "knorm[chunk=sentence]:0.5"])
def test_kept_tokens_match_the_hf_engine(engine, stats_path, hf, spec):
    from kvrag.compression import parse_spec

    engine.flush_cache()
    span = (20, CONTEXT - 30)
    _, _, rid = _generate(engine, PROMPTS["plain"], _params(spec, span))
    record = _stats(stats_path, rid)
    kept = hf.compress(hf.prefill(PROMPTS["plain"]), span, parse_spec(spec)).kept
    assert record is not None and record["spec"] == parse_spec(spec).name
    assert [k.tolist() for k in kept] == record["kept"]


def test_compressed_request_leaves_the_shared_prefix_intact(engine, reference, stats_path):
    engine.flush_cache()
    # a full request puts the prefix in the radix tree
    _generate(engine, PROMPTS["shared_a"], _params("none"))
    # a compressed request over the same prefix reads the tree's slots, frees only its own
    _, _, rid = _generate(engine, PROMPTS["shared_b"], _params("snapkv:0.75"))
    record = _stats(stats_path, rid)
    # the tree holds the 960-token prefix; the request recomputes the 64 scored queries
    assert record is not None and record["protected"] == CONTEXT - 64
    # an uncompressed request over the prefix answers as on a fresh engine
    ids, logprobs, _ = _generate(engine, PROMPTS["shared_b"], _params("none"))
    assert ids == reference["shared_b"][0]
    assert logprobs == pytest.approx(reference["shared_b"][1], abs=1e-5)


def test_concurrent_mixed_lengths_chunked_and_too_short(engine, stats_path):
    engine.flush_cache()
    lengths = [30, 300, 700, 1500]
    prompts = [_ids(10 + i, n) for i, n in enumerate(lengths)]
    outs = engine.generate(input_ids=prompts, sampling_params=_params("streamingllm:0.5"))
    assert [len(o["output_ids"]) for o in outs] == [MAX_NEW] * len(lengths)
    records = [_stats(stats_path, o["meta_info"]["id"]) for o in outs]
    assert records[0] is None  # 30 tokens: all inside the protected tail, nothing to evict
    for n, record in zip(lengths[1:], records[1:], strict=True):
        assert record is not None and record["prompt_tokens"] == n


def test_invalid_request_spec_is_refused_with_the_reason(engine):
    with pytest.raises(ValueError, match=r"kvrag_compression='snapkv:1\.5'.*0 <= RATIO < 1"):
        engine.generate(input_ids=PROMPTS["plain"][:100], sampling_params=_params("snapkv:1.5"))
    ids, _, _ = _generate(engine, PROMPTS["plain"][:100], _params("snapkv:0.5"))
    assert len(ids) == MAX_NEW  # the engine serves on


def test_compaction_evicts_cached_prefixes_when_the_pool_is_full(engine, stats_path):
    engine.flush_cache()
    prompts = [_ids(100 + i, CONTEXT) for i in range(8)]  # 8,000 tokens: the pool is 8,192
    for ids in prompts:
        _generate(engine, ids, _params("none"))
    # the prefix is cached, so the compacted cache needs slots beyond the 64 recomputed
    _, _, rid = _generate(engine, prompts[-1], _params("snapkv:0.0"))
    record = _stats(stats_path, rid)
    assert record is not None and record["keep"] == [CONTEXT, CONTEXT]
    assert record["protected"] == CONTEXT - 64 and record["allocated"] == CONTEXT - 64


def test_settings_the_backend_cannot_serve_stop_the_start(tiny_model_dir):
    # in its own process: SGLang kills the parent process of a scheduler that fails to start
    script = (f"import sglang\nif __name__ == '__main__':\n    sglang.Engine(model_path="
              f"{str(tiny_model_dir)!r}, device='cpu', attention_backend='kvrag', "
              f"disable_overlap_schedule=True, enable_mixed_chunk=True, "
              f"chunked_prefill_size=256, max_total_tokens=4096, skip_tokenizer_init=True)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode != 0
    assert "it cannot run with --enable-mixed-chunk" in run.stderr
