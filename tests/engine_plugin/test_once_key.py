"""The tree key and sizes of a stored compressed corpus prefix (no engine needed)."""

import pytest

from kvrag.compression import SpecError, parse_spec
from kvrag.engine_plugin import config
from kvrag.engine_plugin.once import OnceRequest, kept_prefix, key_tokens, namespace


def test_the_key_is_one_per_prefix_and_spec_and_as_long_as_the_kept_slots() -> None:
    spec, prefix = parse_spec("once:snapkv:0.5"), list(range(1000, 1600))
    kmax = kept_prefix(spec, (20, 600))
    assert kmax == 20 + 290
    key = key_tokens(prefix, spec, kmax)
    assert len(key) == kmax and key == key_tokens(list(prefix), spec, kmax)
    assert key[:4] != key_tokens(prefix[:-1] + [7], spec, kmax)[:4]
    assert key[:4] != key_tokens(prefix, parse_spec("once:snapkv:0.6"), kmax)[:4]
    assert all(0 <= t < 2**31 for t in key)
    assert namespace(spec, None) != namespace(spec, "lora-a")


def test_a_request_knows_its_two_prompts_and_shift() -> None:
    spec = parse_spec("once:knorm@100")
    prompt = list(range(5000, 5700))
    once = OnceRequest.of(spec, (10, 650), prompt, None, None)
    assert once.kmax == 110 and once.shift == 0  # nothing shifts until it runs as a hit
    once.state = "hit"
    assert once.shift == 650 - 110
    hit = once.hit_prompt()
    assert list(hit[110:]) == prompt[650:] and len(hit) == 110 + 50
    assert list(once.real) == prompt


def test_once_requests_need_a_span_that_leaves_a_question() -> None:
    wanted = config.for_request({"kvrag_compression": "once:snapkv:0.5",
                                 "kvrag_span": [5, 900]}, 1000)
    assert wanted.spec.once and wanted.span == (5, 900)
    with pytest.raises(SpecError, match="needs custom_params.kvrag_span"):
        config.for_request({"kvrag_compression": "once:snapkv:0.5"}, 1000)
    with pytest.raises(SpecError, match="must end before the prompt does"):
        config.for_request({"kvrag_compression": "once:snapkv:0.5",
                            "kvrag_span": [5, 1000]}, 1000)
    with pytest.raises(SpecError, match="one kept count for every layer"):
        config.for_request({"kvrag_compression": "once:pyramidkv:0.5",
                            "kvrag_span": [5, 900]}, 1000)


def test_a_recalling_request_runs_its_question_twice_then_shifts_past_its_recall() -> None:
    spec = parse_spec("once:snapkv[heads=shared]:0.5+recall@32")
    prompt = list(range(5000, 5700))
    once = OnceRequest.of(spec, (10, 650), prompt, None, None)
    once.state = "hit"
    assert list(once.hit_prompt()[once.kmax:]) == prompt[650:] * 2
    assert once.cut(once.kmax) == once.kmax + 50  # the scoring pass ends with its copy
    once.recall.pending, once.recall.tokens = False, 32
    assert once.cut(once.kmax + 32) is None
    assert once.shift == 650 - once.kmax - 32
    once.state = "miss"  # the request that built the prefix runs at its real positions
    assert once.shift == -32
