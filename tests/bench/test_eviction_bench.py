"""The eviction benchmark's traces, its offline optimum, and the replay on SGLang's tree."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
from typer.testing import CliRunner

from kvrag.bench.eviction import (
    OPTIMAL,
    POLICIES,
    parse_policy,
    replay,
    run_eviction_benchmark,
    split_policies,
)
from kvrag.bench.eviction_optimum import optimal_matched
from kvrag.bench.eviction_traces import WORKLOADS, Workload, make_trace
from kvrag.cli.main import app

SMALL = Workload(corpora=3, corpus_tokens=(200, 400), questions=40, question_tokens=(5, 10),
                 answer_tokens=4, header_tokens=8, cache_corpora=1.5)


def corpus_ids(trace, workload: Workload) -> list[int]:
    """A corpus's first token names it."""
    return [prompt[workload.header_tokens] for prompt, _ in trace]


def test_trace_is_seeded_and_shaped_as_documented() -> None:
    workload = WORKLOADS["stationary"]
    trace = make_trace(workload, 0)
    assert trace == make_trace(workload, 0)
    assert trace != make_trace(workload, 1)
    assert len(trace) == workload.questions
    header = trace[0][0][:workload.header_tokens]
    for prompt, answer in trace:
        assert prompt[:workload.header_tokens] == header
        assert len(answer) == workload.answer_tokens
    firsts = Counter(corpus_ids(trace, workload))
    assert len(firsts) == workload.corpora
    counts = sorted(firsts.values(), reverse=True)
    assert counts[0] > 3 * counts[-1]  # Zipf(1) over 6 ranks: weights 1 and 1/6


def test_phases_redraw_the_most_asked_corpus() -> None:
    workload = WORKLOADS["phases"]
    ids = corpus_ids(make_trace(workload, 0), workload)
    tops = [Counter(ids[i * 100:(i + 1) * 100]).most_common(1)[0][0] for i in range(3)]
    assert len(set(tops)) > 1


def test_bursts_ask_one_corpus_many_times_in_a_row() -> None:
    workload = WORKLOADS["bursts"]
    ids = corpus_ids(make_trace(workload, 0), workload)
    runs = [len(list(group)) for _, group in itertools.groupby(ids)]
    stationary = corpus_ids(make_trace(WORKLOADS["stationary"], 0), WORKLOADS["stationary"])
    plain_runs = [len(list(group)) for _, group in itertools.groupby(stationary)]
    assert len(ids) / len(runs) > 5 > len(stationary) / len(plain_runs)
    assert len(set(ids)) > 6  # bursts move across the corpora


def test_system_prompt_trace_shares_only_the_system_prompt() -> None:
    workload = WORKLOADS["system-prompt"]
    trace = make_trace(workload, 0)
    assert len(set(corpus_ids(trace, workload))) == len(trace)
    assert len({tuple(p[:workload.header_tokens]) for p, _ in trace}) == 1


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


def best_schedule(trace, capacity: int) -> int:
    """Exhaustive search: after each request, keep any set of cached tokens that fits.

    A token is named by the whole sequence up to it, so equal prefixes are one token."""
    paths = [[tuple((prompt + answer)[:i + 1]) for i in range(len(prompt + answer))]
             for prompt, answer in trace]
    states = {frozenset(): 0}
    for (prompt, _), path in zip(trace, paths, strict=True):
        after: dict = {}
        for cached, total in states.items():
            found = next((i for i, n in enumerate(path[:len(prompt)]) if n not in cached),
                         len(prompt))
            others = sorted(cached - set(path))
            for k in range(min(capacity - len(path), len(others)) + 1):
                for kept in itertools.combinations(others, k):
                    state = frozenset(kept) | frozenset(path)
                    after[state] = max(after.get(state, -1), total + found)
        states = after
    return max(states.values())


def tiny_trace(rng: random.Random) -> list:
    corpora = [[rng.randint(100, 999) * 10 + j for j in range(rng.randint(1, 3))]
               for _ in range(3)]
    trace = []
    for i in range(rng.randint(3, 7)):
        prompt = [1, *rng.choice(corpora)]
        if trace and rng.random() < 0.3:  # a follow-up: the last prompt and answer, then more
            prompt = trace[-1][0] + trace[-1][1]
        trace.append((prompt + [10**6 + i] * rng.randint(0, 1), [2 * 10**6 + i]))
    return trace


def test_optimum_equals_an_exhaustive_search_on_tiny_traces() -> None:
    rng = random.Random(0)
    checked = 0
    for _ in range(150):
        trace = tiny_trace(rng)
        largest = max(len(p) + len(a) for p, a in trace)
        if largest > 7:
            continue
        capacity = rng.randint(largest, 7)
        assert optimal_matched(trace, capacity) == best_schedule(trace, capacity), trace
        checked += 1
    assert checked > 100


def test_optimum_with_room_for_everything_matches_every_repeated_prefix() -> None:
    trace = make_trace(SMALL, 3)
    assert optimal_matched(trace, 10**6) == matched_without_eviction(trace)


@pytest.mark.parametrize("policy", POLICIES)
def test_no_policy_beats_the_optimum(policy: str) -> None:
    name, config = parse_policy(policy)
    for seed in range(3):
        trace = make_trace(SMALL, seed)
        assert replay(trace, name, SMALL.capacity(), config) \
            <= optimal_matched(trace, SMALL.capacity())


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_with_room_for_everything_matches_every_repeated_prefix(policy: str) -> None:
    name, config = parse_policy(policy)
    trace = make_trace(SMALL, 3)
    assert replay(trace, name, 10**6, config) == matched_without_eviction(trace)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_cache_smaller_than_the_working_set_loses_hits(policy: str) -> None:
    name, config = parse_policy(policy)
    trace = make_trace(SMALL, 3)
    assert 0 < replay(trace, name, SMALL.capacity(), config) < matched_without_eviction(trace)


@pytest.mark.parametrize("count", [replay, optimal_matched])
def test_a_request_larger_than_the_cache_is_refused(count) -> None:
    trace = make_trace(SMALL, 3)
    args = (trace, "lru", 100) if count is replay else (trace, 100)
    with pytest.raises(ValueError, match="does not fit a 100-token cache"):
        count(*args)


def test_benchmark_rows_compare_policies_on_the_same_traces() -> None:
    rows = run_eviction_benchmark(seeds=(0,), workload=WORKLOADS["stationary"],
                                  name="stationary")
    assert [row["policy"] for row in rows] == [*POLICIES, OPTIMAL]
    prompt_tokens = sum(len(p) for p, _ in make_trace(WORKLOADS["stationary"], 0))
    by_policy = {row["policy"]: row for row in rows}
    for row in rows:
        assert row["workload"] == "stationary"
        assert row["prompt_tokens"] == prompt_tokens
        assert row["hit_rate"] == pytest.approx(1 - row["recomputed"] / prompt_tokens)
        assert row["recomputed_vs_lru"] == pytest.approx(
            row["recomputed"] / by_policy["lru"]["recomputed"])
        assert row["recomputed_vs_optimal"] >= 1 - 1e-12
    # What the policy is for: corpora outlive one-off questions, and the part of a
    # corpus an eviction does not need stays cached.
    assert by_policy["kvrag-cost"]["recomputed"] \
        < by_policy["kvrag-cost[partial=false]"]["recomputed"] \
        < by_policy["lru"]["recomputed"]


def test_without_lru_there_is_no_lru_ratio() -> None:
    rows = run_eviction_benchmark(policies=("lfu",), seeds=(0,), workload=SMALL)
    assert rows[0]["recomputed_vs_lru"] is None
    assert rows[0]["recomputed_vs_optimal"] >= 1


@pytest.mark.parametrize(("text", "expected"), [
    ("lru", ("lru", {})),
    ("kvrag-cost[partial=false]", ("kvrag-cost", {"partial": False})),
    ("kvrag-cost[ghosts=16; partial=true]", ("kvrag-cost", {"ghosts": 16, "partial": True})),
    ("slru[mode=fast]", ("slru", {"mode": "fast"})),
])
def test_policy_options_parse(text: str, expected: tuple) -> None:
    assert parse_policy(text) == expected


@pytest.mark.parametrize("text", ["kvrag-cost[partial]", "kvrag cost", "lru[a=1"])
def test_malformed_policies_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="policy"):
        parse_policy(text)


def test_policy_list_splits_outside_brackets() -> None:
    assert split_policies("lru, kvrag-cost[ghosts=0;partial=false],slru") == [
        "lru", "kvrag-cost[ghosts=0;partial=false]", "slru"]


def test_cli_prints_each_workload_and_writes_rows(tmp_path) -> None:
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, [
        "bench", "eviction", "--workloads", "system-prompt,bursts", "--seeds", "1",
        "--policies", "lru,kvrag-cost[ghosts=0]", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "system-prompt: a document per request" in result.output
    assert "bursts: 12 corpora" in result.output and "seeds 0-0" in result.output
    rows = json.loads(out.read_text())
    assert [(r["workload"], r["policy"]) for r in rows] == [
        (w, p) for w in ("system-prompt", "bursts")
        for p in ("lru", "kvrag-cost[ghosts=0]", OPTIMAL)]
    for row in rows:
        assert {"workload", "policy", "recomputed", "hit_rate"} <= set(row)
    # Only the system prompt can be reused: every policy is optimal there.
    assert {r["recomputed"] for r in rows if r["workload"] == "system-prompt"} == {
        next(r["recomputed"] for r in rows if r["policy"] == OPTIMAL)}


@pytest.mark.parametrize(("args", "message"), [
    (["--workloads", "zipf"], "unknown zipf; choose from stationary, phases"),
    (["--policies", "kvrag-cost[decay=2]"], "does not take 'decay'; allowed keys: ghosts"),
    (["--policies", "kvrag-cost[partial=maybe]"], "partial must be true or false"),
    (["--policies", "belady"], "Unknown eviction policy: belady"),
])
def test_cli_refuses_bad_input_saying_what_is_allowed(args: list, message: str) -> None:
    result = CliRunner().invoke(app, ["bench", "eviction", "--workloads", "system-prompt",
                                      "--seeds", "1", *args])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
