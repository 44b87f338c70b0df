"""Both decode paths of the plugin in the real engine, against each other and torch_native.

One mixed workload (submitted at once, so its requests share batches: compacted ones,
uncompressed ones, one prefilled in chunks after others were compacted, two over a prefix
the radix tree holds) runs on three engines in turn: torch_native, kvrag decoding in
Python (``KVRAG_DECODE_PATH=python``), and kvrag decoding through torch_native over the
compacted requests' physical rows (``inner``, the path every GPU takes). SGLang's strict
memory checks are on throughout.
"""

from __future__ import annotations

import json
import random

import pytest

pytestmark = pytest.mark.slow

MAX_NEW = 8


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(200, 40000) for _ in range(n)]


PREFIX = _ids(50, 700)
# name: (prompt, compression); "none" and snapkv:0.0 must also equal torch_native
WORKLOAD = {
    "ratio0": (_ids(51, 600), "snapkv:0.0"),
    "snapkv": (_ids(52, 700), "snapkv:0.5"),
    "chunked": (_ids(53, 1300), "streamingllm:0.5"),
    "full": (_ids(54, 400), "none"),
    "shared_snapkv": (PREFIX + _ids(55, 90), "snapkv:0.5"),
    "shared_full": (PREFIX + _ids(56, 90), "none"),
}
EXACT_AS_TORCH_NATIVE = ("ratio0", "full", "shared_full")
UNEVEN = {"pyramid": (_ids(57, 500), "pyramidkv:0.5"), "beside": (_ids(58, 300), "none")}


def _params(compression: str) -> dict:
    return {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True,
            "custom_params": {"kvrag_compression": compression}}


def _serve(model_dir, backend: str, workload: dict) -> dict[str, tuple[list, list, str]]:
    import sglang

    engine = sglang.Engine(
        model_path=str(model_dir), device="cpu", attention_backend=backend, dtype="float32",
        disable_cuda_graph=True, disable_overlap_schedule=True, max_total_tokens=8192,
        mem_fraction_static=0.3, skip_tokenizer_init=True, random_seed=0,
        chunked_prefill_size=256)
    try:
        engine.generate(input_ids=PREFIX + _ids(59, 20), sampling_params=_params("none"))
        names = list(workload)
        outs = engine.generate(input_ids=[workload[n][0] for n in names],
                               sampling_params=[_params(workload[n][1]) for n in names],
                               return_logprob=True)
        return {name: (out["output_ids"],
                       [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]],
                       out["meta_info"]["id"]) for name, out in zip(names, outs, strict=True)}
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    stats = tmp_path_factory.mktemp("paths") / "stats.jsonl"
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY",
                    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"):
            mp.setenv(var, "1")
        mp.setenv("KVRAG_PLUGIN_STATS", str(stats))
        out["torch_native"] = _serve(tiny_model_dir, "torch_native", WORKLOAD)
        for path in ("python", "inner"):
            mp.setenv("KVRAG_DECODE_PATH", path)
            out[path] = _serve(tiny_model_dir, "kvrag", WORKLOAD | UNEVEN)
    records = {}
    for line in stats.read_text().splitlines():
        record = json.loads(line)
        records[record["rid"]] = record
    return out, records


def test_every_compressed_request_was_compacted(runs):
    out, records = runs
    for path in ("python", "inner"):
        for name, (_, compression) in (WORKLOAD | UNEVEN).items():
            record = records.get(out[path][name][2])
            assert (record is not None) == (compression != "none"), (path, name)
    shared = records[out["inner"]["shared_snapkv"][2]]
    assert shared["protected"] > 0  # its prefix came from the radix tree


@pytest.mark.parametrize("name", list(WORKLOAD | UNEVEN))
def test_inner_path_gives_the_python_paths_tokens_and_logprobs(runs, name):
    out, _ = runs
    ids, logprobs, _ = out["inner"][name]
    want_ids, want_logprobs, _ = out["python"][name]
    assert len(ids) == MAX_NEW
    assert ids == want_ids
    assert logprobs == pytest.approx(want_logprobs, abs=1e-5)


@pytest.mark.parametrize("path", ["python", "inner"])
@pytest.mark.parametrize("name", EXACT_AS_TORCH_NATIVE)
def test_full_caches_and_ratio_zero_give_torch_natives_outputs(runs, path, name):
    out, _ = runs
    ids, logprobs, _ = out[path][name]
    want_ids, want_logprobs, _ = out["torch_native"][name]
    assert ids == want_ids
    assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
