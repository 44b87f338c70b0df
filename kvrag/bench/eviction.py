"""Trace-driven radix-cache eviction benchmark: recomputed prefill per eviction policy.

The workload is long-context QA: every prompt is a shared instruction header, one of a
few corpora of a few thousand tokens, and a short one-off question; the answer decoded
after it is cached too, as SGLang does. Questions pick their corpus from a Zipf
distribution, so corpora interleave with a skew, and the cache holds only a few corpora.
Optionally the popularity ranking is redrawn in phases, which rewards policies that age
a corpus once it stops being asked about.

Each policy replays the same traces on SGLang's own ``UnifiedRadixCache`` with the Python
TreeCore (the tree the engine runs for ``kvrag-cost``), without memory pools: the replay
counts capacity itself. Requests run one at a time through the calls the scheduler makes:
match the prompt, lock the match, evict what the new tokens need beyond the free
capacity, insert prompt + answer (as ``cache_finished_req`` does), unlock.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

POLICIES = ("lru", "lfu", "slru", "kvrag-cost")


@dataclass(frozen=True)
class Workload:
    corpora: int = 6  # distinct documents
    corpus_tokens: tuple[int, int] = (2000, 4000)  # length range, uniform
    questions: int = 300
    question_tokens: tuple[int, int] = (20, 60)
    answer_tokens: int = 16  # decoded, then cached behind the question
    header_tokens: int = 32  # instruction template shared by every prompt
    zipf: float = 1.0  # corpus of popularity rank r is asked with weight 1 / r ** zipf
    phases: int = 1  # the popularity ranking is redrawn at the start of each phase
    cache_corpora: float = 2.5  # cache capacity in mean corpus lengths

    def capacity(self) -> int:
        return int(self.cache_corpora * sum(self.corpus_tokens) / 2)


Request = tuple[list[int], list[int]]  # (prompt, answer) token ids


def make_trace(workload: Workload, seed: int) -> list[Request]:
    """A seeded trace; token ids never repeat except through a shared header or corpus."""
    rng = random.Random(seed)
    next_id = iter(range(1, 1 << 62))

    def fresh(n: int) -> list[int]:
        return [next(next_id) for _ in range(n)]

    header = fresh(workload.header_tokens)
    corpora = [fresh(rng.randint(*workload.corpus_tokens)) for _ in range(workload.corpora)]
    weights = [1 / (rank + 1) ** workload.zipf for rank in range(workload.corpora)]
    trace = []
    for phase in range(workload.phases):
        ranking = rng.sample(corpora, len(corpora))  # ranking[0] is the most asked
        count = workload.questions * (phase + 1) // workload.phases - len(trace)
        for corpus in rng.choices(ranking, weights, k=count):
            question = fresh(rng.randint(*workload.question_tokens))
            trace.append((header + corpus + question, fresh(workload.answer_tokens)))
    return trace


class _NoPool:
    """Allocator stand-in: the simulation tracks capacity itself, so frees are no-ops."""

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def free_segment(self, indices: Any, start_pos: int = 0) -> None:
        pass


def replay(trace: Sequence[Request], policy: str, capacity: int,
           config: Mapping[str, Any] | None = None) -> int:
    """Prompt tokens matched in the cache over ``trace`` (the rest are recomputed)."""
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import (
        EvictParams,
        InsertParams,
        MatchPrefixParams,
    )
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    from kvrag.engine_plugin.eviction import register_eviction_policy

    register_eviction_policy()  # kvrag-cost, wherever the replay is called from

    cache = UnifiedRadixCache(CacheInitParams(
        disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=_NoPool(),
        page_size=1, eviction_policy=policy,
        eviction_policy_config=dict(config) if config else None,
        tree_components=(ComponentType.FULL,), tree_core_backend="python"))
    matched = 0
    for prompt, answer in trace:
        match = cache.match_prefix(MatchPrefixParams(key=RadixKey(prompt)))
        matched += match.device_prefix_len
        lock = cache.lock(match.last_device_node)
        tokens = prompt + answer
        free = capacity - cache.evictable_size() - cache.protected_size()
        shortfall = len(tokens) - match.device_prefix_len - free
        if shortfall > 0 and cache.evict(EvictParams(num_tokens=shortfall)) \
                .num_tokens_evicted < shortfall:
            raise ValueError(f"a {len(tokens)}-token request does not fit a {capacity}-token "
                             f"cache beside its locked prefix; give the cache more tokens")
        cache.insert(InsertParams(key=RadixKey(tokens), value=torch.arange(len(tokens))))
        cache.unlock(lock)
    return matched


def run_eviction_benchmark(policies: Sequence[str] = POLICIES,
                           seeds: Sequence[int] = (0, 1, 2),
                           workload: Workload = Workload(),
                           configs: Mapping[str, Mapping[str, Any]] | None = None,
                           ) -> list[dict[str, Any]]:
    """One row per policy, totals over one trace per seed (the same traces for all).

    Rows: policy, prompt_tokens, recomputed_tokens (prompt tokens not found in the cache,
    so prefilled again), hit_rate (matched / prompt tokens), recomputed_vs_lru (None
    without an lru row, or if lru recomputed nothing). ``configs`` maps a policy to its
    ``--radix-eviction-policy-config`` options.
    """
    traces = [make_trace(workload, seed) for seed in seeds]
    prompt_tokens = sum(len(prompt) for trace in traces for prompt, _ in trace)
    rows = []
    for policy in policies:
        config = (configs or {}).get(policy)
        matched = sum(replay(trace, policy, workload.capacity(), config) for trace in traces)
        rows.append({"policy": policy, "prompt_tokens": prompt_tokens,
                     "recomputed_tokens": prompt_tokens - matched,
                     "hit_rate": matched / prompt_tokens})
    lru = next((row["recomputed_tokens"] for row in rows if row["policy"] == "lru"), None)
    for row in rows:
        row["recomputed_vs_lru"] = row["recomputed_tokens"] / lru if lru else None
    return rows
