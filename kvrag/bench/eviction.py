"""Trace-driven radix-cache eviction benchmark: recomputed prefill per eviction policy.

Each policy replays the same traces (``eviction_traces``) on SGLang's own
``UnifiedRadixCache`` with the Python TreeCore (the tree the engine runs for
``kvrag-cost``), without memory pools: the replay counts capacity itself. Requests run
one at a time through the calls the scheduler makes: match the prompt, lock the match,
evict what the new tokens need beyond the free capacity, insert prompt + answer (as
``cache_finished_req`` does), unlock. Beside the policies, ``optimal`` is the fewest
tokens any policy could recompute on the same traces (``eviction_optimum``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvrag.bench.eviction_optimum import optimal_matched
from kvrag.bench.eviction_traces import Request, Workload, make_trace

POLICIES = ("lru", "lfu", "slru", "kvrag-cost", "kvrag-cost[partial=false]")
OPTIMAL = "optimal"
_POLICY = re.compile(r"^([A-Za-z0-9_-]+)(?:\[([^\]]*)\])?$")


def parse_policy(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME[key=value;...]``: a policy and its ``--radix-eviction-policy-config``.

    Values are JSON (``true``, ``4096``, ``"x"``); a bare word is a string.
    """
    match = _POLICY.match(text.strip())
    if not match:
        raise ValueError(f"policy {text!r}: expected NAME or NAME[key=value;...]")
    name, body = match.group(1), match.group(2)
    config: dict[str, Any] = {}
    for item in filter(None, (body or "").split(";")):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"policy {text!r}: option {item!r} is not key=value")
        try:
            config[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            config[key.strip()] = raw.strip()
    return name, config


def split_policies(text: str) -> list[str]:
    """Split a policy list on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


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


def run_eviction_benchmark(policies: Iterable[str] = POLICIES,
                           seeds: Sequence[int] = (0, 1, 2),
                           workload: Workload | None = None,
                           name: str = "custom") -> list[dict[str, Any]]:
    """One row per policy and one ``optimal`` row: totals over one trace per seed.

    Rows: workload, policy (as given, options included), prompt_tokens, recomputed
    (prompt tokens not found in the cache, so prefilled again), hit_rate (matched /
    prompt tokens), recomputed_vs_lru (None without an lru row, or if lru recomputed
    nothing) and recomputed_vs_optimal (None if nothing had to be recomputed).
    """
    workload = workload or Workload()
    parsed = [(policy, *parse_policy(policy)) for policy in policies]
    traces = [make_trace(workload, seed) for seed in seeds]
    capacity = workload.capacity()
    prompt_tokens = sum(len(prompt) for trace in traces for prompt, _ in trace)
    matched = {label: sum(replay(trace, policy, capacity, config) for trace in traces)
               for label, policy, config in parsed}
    matched[OPTIMAL] = sum(optimal_matched(trace, capacity) for trace in traces)
    rows = [{"workload": name, "policy": label, "prompt_tokens": prompt_tokens,
             "recomputed": prompt_tokens - hits, "hit_rate": hits / prompt_tokens}
            for label, hits in matched.items()]
    by_policy = {row["policy"]: row["recomputed"] for row in rows}
    for row in rows:
        for key, base in (("recomputed_vs_lru", by_policy.get("lru")),
                          ("recomputed_vs_optimal", by_policy[OPTIMAL])):
            row[key] = row["recomputed"] / base if base else None
    return rows
