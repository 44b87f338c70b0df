"""The eviction benchmark's traces and replay on SGLang's unified radix cache."""

from __future__ import annotations

from collections import Counter

import pytest

from kvrag.bench.eviction import (
    POLICIES,
    Workload,
    make_trace,
    replay,
    run_eviction_benchmark,
)

SMALL = Workload(corpora=3, corpus_tokens=(200, 400), questions=40, question_tokens=(5, 10),
                 answer_tokens=4, header_tokens=8, cache_corpora=1.5)


def test_trace_is_seeded_and_shaped_as_documented() -> None:
    workload = Workload()
    trace = make_trace(workload, 0)
    assert trace == make_trace(workload, 0)
    assert trace != make_trace(workload, 1)
    assert len(trace) == workload.questions
    header = trace[0][0][:workload.header_tokens]
    firsts = Counter()
    for prompt, answer in trace:
        assert prompt[:workload.header_tokens] == header
        assert len(answer) == workload.answer_tokens
        firsts[prompt[workload.header_tokens]] += 1  # a corpus's first token names it
    assert len(firsts) == workload.corpora
    counts = sorted(firsts.values(), reverse=True)
    assert counts[0] > 3 * counts[-1]  # Zipf(1) over 6 ranks: weights 1 and 1/6


def test_phases_redraw_the_most_asked_corpus() -> None:
    workload = Workload(phases=3)
    trace = make_trace(workload, 0)
    tops = [Counter(p[workload.header_tokens] for p, _ in trace[i * 100:(i + 1) * 100])
            .most_common(1)[0][0] for i in range(3)]
    assert len(set(tops)) > 1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def matched_without_eviction(trace) -> int:
    """Oracle: each prompt's longest prefix shared with any earlier prompt + answer."""
    return sum(max((common_prefix(prompt, p + a) for p, a in trace[:i]), default=0)
               for i, (prompt, _) in enumerate(trace))


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_with_room_for_everything_matches_every_repeated_prefix(policy: str) -> None:
    trace = make_trace(SMALL, 3)
    assert replay(trace, policy, capacity=10**6) == matched_without_eviction(trace)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_cache_smaller_than_the_working_set_loses_hits(policy: str) -> None:
    trace = make_trace(SMALL, 3)
    assert 0 < replay(trace, policy, SMALL.capacity()) < matched_without_eviction(trace)


def test_a_request_larger_than_the_cache_is_refused() -> None:
    trace = make_trace(SMALL, 3)
    with pytest.raises(ValueError, match="does not fit a 100-token cache"):
        replay(trace, "lru", capacity=100)


def test_benchmark_rows_compare_policies_on_the_same_traces() -> None:
    rows = run_eviction_benchmark(seeds=(0,))
    assert [row["policy"] for row in rows] == list(POLICIES)
    prompt_tokens = sum(len(p) for p, _ in make_trace(Workload(), 0))
    by_policy = {row["policy"]: row for row in rows}
    for row in rows:
        assert row["prompt_tokens"] == prompt_tokens
        assert row["hit_rate"] == pytest.approx(1 - row["recomputed_tokens"] / prompt_tokens)
        assert row["recomputed_vs_lru"] == pytest.approx(
            row["recomputed_tokens"] / by_policy["lru"]["recomputed_tokens"])
    # What the policy is for: corpora outlive one-off questions, so fewer tokens recomputed.
    assert by_policy["kvrag-cost"]["recomputed_tokens"] < by_policy["lru"]["recomputed_tokens"]


def test_without_lru_there_is_no_ratio() -> None:
    rows = run_eviction_benchmark(policies=("lfu",), seeds=(0,), workload=SMALL)
    assert rows[0]["recomputed_vs_lru"] is None
