"""An answer's cost from an SGLang server's report, and the checks on what it says."""

from __future__ import annotations

import pytest

from kvrag.compression import parse_spec
from kvrag.engines.chat import EncodedPrompt
from kvrag.engines.served import Timing, UncompressedError, served_cost

ENC = EncodedPrompt(list(range(1000)), 10, 900)
TIMING = Timing(prefill_s=1.0, decode_s=0.5)


def test_a_compressed_answer_costs_what_the_server_reports():
    report = {"spec": "snapkv:0.5", "kv_tokens": 555, "kv_bytes": 555 * 64,
              "layer_mean_kv_tokens": 555.0, "seconds": 0.25, "prefill_tokens": 1000}
    cost = served_cost(ENC, parse_spec("snapkv:0.5"), {"kvrag": [report]}, TIMING, 4, 64)
    assert (cost.kv_tokens, cost.kv_bytes, cost.compress_s) == (555, 555 * 64, 0.25)
    assert cost.prefill_s == pytest.approx(0.75)


def test_answers_of_the_wrong_kind_are_refused():
    plain = {"kv_tokens": 1000, "kv_bytes": 64000, "layer_mean_kv_tokens": 1000.0}
    with pytest.raises(UncompressedError, match="left the snapkv:0.5 request uncompressed"):
        served_cost(ENC, parse_spec("snapkv:0.5"), {"kvrag": [plain]}, TIMING, 4, 64)
    # a full-cache request that came back compressed: its parameters were lost on the way
    # (a router that drops them, say) and the server's default spec answered it
    compressed = plain | {"spec": "snapkv:0.5", "kv_tokens": 500}
    with pytest.raises(RuntimeError, match="did not reach the plugin"):
        served_cost(ENC, None, {"kvrag": [compressed]}, TIMING, 4, 64)


def test_a_recalling_answer_reports_its_recall_apart_from_its_prefill():
    spec = parse_spec("once:snapkv[heads=shared]:0.5+recall@64")
    report = {"spec": spec.name, "kv_tokens": 600, "kv_bytes": 600 * 64,
              "layer_mean_kv_tokens": 600.0, "seconds": 0.0, "prefill_tokens": 200,
              "shared_kv_tokens": 455.0, "recalled_tokens": 64, "recall_seconds": 0.125,
              "host_kv_bytes": 1 << 20}
    cost = served_cost(ENC, spec, {"kvrag": [report]}, TIMING, 4, 64)
    assert (cost.recalled_tokens, cost.recall_s, cost.host_kv_bytes) == (64, 0.125, 1 << 20)
    assert cost.prefill_s == pytest.approx(0.875) and cost.shared_kv_tokens == 455
    assert cost.latency_s == pytest.approx(1.5)
