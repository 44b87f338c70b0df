"""kvrag-cost on SGLang's own radix trees (classic RadixCache and the unified Python core).

No engine: the trees run with an allocator stand-in that records every segment SGLang
frees, so eviction order is read from the tree's frees, not from the strategy.
"""

from __future__ import annotations

import argparse
from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.mem_cache.rust_tree_core.adapter import RustUnifiedTreeCore
from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.mem_cache.utils import _EVICTION_POLICY_FACTORIES, get_eviction_strategy
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.server_args import ServerArgs

from kvrag.engine_plugin import eviction
from kvrag.engine_plugin.eviction import POLICY_NAME, KvragCostStrategy, register_eviction_policy

TREES = ("classic", "unified")


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    register_eviction_policy()


class RecordingPool:
    """Allocator stand-in; values are the token ids, so a freed segment names its node."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.freed: list[tuple[int, ...]] = []

    def free_segment(self, indices: torch.Tensor, start_pos: int = 0) -> None:
        self.freed.append(tuple(indices.tolist()))


def make_cache(tree: str, policy: str, config: dict | None = None,
               core: str | None = "python") -> tuple[RadixCache | UnifiedRadixCache, RecordingPool]:
    pool = RecordingPool()
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=pool,
                             page_size=1, eviction_policy=policy, eviction_policy_config=config)
    if tree == "classic":
        return RadixCache(params), pool
    params.tree_components = (ComponentType.FULL,)
    params.tree_core_backend = core
    return UnifiedRadixCache(params), pool


def strategy_of(cache) -> KvragCostStrategy:
    return getattr(cache, "tree_core", cache).eviction_strategy


def insert(cache, tokens: list[int]) -> None:
    cache.insert(InsertParams(key=RadixKey(tokens), value=torch.tensor(tokens)))


def evict(cache, pool: RecordingPool, num_tokens: int) -> list[tuple[int, ...]]:
    """The segments one ``evict`` call frees, in order (inserts also free duplicates)."""
    pool.freed.clear()
    cache.evict(EvictParams(num_tokens=num_tokens))
    return list(pool.freed)


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# The hand-built tree: a 40-token prefix P under five 4-token questions Q0..Q4 (inserted
# in that order, so P has 5 hits), then two 8-token one-off branches B0, B1.
P = seq(1000, 40)
QS = [seq(2000 + 10 * i, 4) for i in range(5)]
BS = [seq(3000, 8), seq(3100, 8)]
TOTAL = len(P) + 4 * len(QS) + 8 * len(BS)


def build_tree(cache) -> None:
    for q in QS:
        insert(cache, P + q)
    for b in BS:
        insert(cache, b)


# kvrag-cost: every one-off branch (1 hit) has value 0 and they go least recently used
# first; P, reused 4 times, outlives B0 and B1 although they were used after it.
KVRAG_ORDER = [*QS, *BS, P]
# lru: P was last touched by Q4's insert, before B0 and B1.
LRU_ORDER = [*QS, P, *BS]


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize(("policy", "order"), [(POLICY_NAME, KVRAG_ORDER), ("lru", LRU_ORDER)])
def test_eviction_order_on_hand_built_tree(tree: str, policy: str, order: list) -> None:
    cache, pool = make_cache(tree, policy, {"partial": False} if policy == POLICY_NAME else None)
    build_tree(cache)
    assert evict(cache, pool, TOTAL) == [tuple(x) for x in order]


def test_partial_eviction_frees_only_the_tail_an_eviction_needs() -> None:
    """46 tokens are asked for: the questions and B0, B1 free 36, so P gives up its last 10
    tokens and its first 30 stay cached and still match."""
    cache, pool = make_cache("unified", POLICY_NAME)
    build_tree(cache)
    freed = evict(cache, pool, 4 * len(QS) + 8 * len(BS) + 10)
    assert freed == [*map(tuple, QS), *map(tuple, BS), tuple(P[30:])]
    assert cache.match_prefix(MatchPrefixParams(key=RadixKey(P + [7]))).device_prefix_len == 30
    assert cache.evictable_size() == 30


@pytest.mark.parametrize(("tree", "config"), [("unified", {"partial": False}),
                                              ("classic", None)])
def test_without_partial_eviction_the_last_victim_goes_whole(tree: str, config) -> None:
    cache, pool = make_cache(tree, POLICY_NAME, config)
    build_tree(cache)
    freed = evict(cache, pool, 4 * len(QS) + 8 * len(BS) + 10)
    assert freed[-1] == tuple(P)
    assert cache.match_prefix(MatchPrefixParams(key=RadixKey(P + [7]))).device_prefix_len == 0


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize(("ghosts", "first"), [(4096, "Y"), (0, "X")])
def test_a_reused_prefix_evicted_and_cached_again_gets_its_history_back(
        tree: str, ghosts: int, first: str) -> None:
    """X is used 4 times, evicted, then cached again once, before a one-off Y. With ghosts
    X has 5 hits since its first use (value > 0) and Y (value 0) goes first; without,
    both are new and X, the older, goes first."""
    cache, pool = make_cache(tree, POLICY_NAME, {"ghosts": ghosts, "partial": False})
    x, y = seq(500, 10), seq(600, 10)
    for _ in range(4):
        insert(cache, x)
    evict(cache, pool, 10)
    insert(cache, x)
    insert(cache, y)
    strategy = strategy_of(cache)
    node = next(iter(getattr(cache, "tree_core", cache).root_node.children.values()))
    assert node.key.token_ids[0] == 500
    assert strategy.history(node)[0] == (5 if ghosts else 1)
    assert evict(cache, pool, 10) == [tuple(x if first == "X" else y)]


def test_the_ghost_table_forgets_the_oldest_first() -> None:
    strategy = KvragCostStrategy(ghosts=2)
    root = SimpleNamespace(id=0, parent=None)
    for k in (1, 2, 3):
        strategy.on_evict(SimpleNamespace(parent=root, key=RadixKey([k]), hit_count=3,
                                          creation_time=float(k)))
    assert list(strategy._ghosts) == [(0, 2), (0, 3)]


def stand_in(hits: int, created: float, size: int = 8, key=None) -> SimpleNamespace:
    """A tree node's attributes the strategy reads, under the root."""
    root = SimpleNamespace(id=0, parent=None)
    return SimpleNamespace(id=1, parent=root, key=key or RadixKey(seq(1, size)),
                           hit_count=hits, creation_time=created, last_access_time=created)


@pytest.mark.parametrize(("target", "now", "expected"), [
    (stand_in(5, 0.0), 10.0, 0.4),           # 4 reuses in 10 clock units
    (stand_in(1, 0.0), 10.0, 0.0),           # never reused
    (stand_in(0, 0.0), 10.0, 0.0),           # no hits counted (HiCache write-back)
    (stand_in(3, 10.0), 10.0, 0.0),          # no time has passed
    (stand_in(41, 0.0), 400.0, 0.1),         # once popular, idle since: its rate falls
])
def test_value_is_the_reuse_rate_since_first_cached(target, now: float, expected: float) -> None:
    strategy = KvragCostStrategy()
    strategy.clock = lambda: now
    assert strategy.get_priority(target) == (pytest.approx(expected), target.last_access_time)


def test_a_prefix_that_stops_being_used_falls_below_one_in_use() -> None:
    """A: 40 reuses by clock 100, then none; B: cached at 100, reused every 10 units."""
    strategy = KvragCostStrategy()
    a = stand_in(41, 0.0)
    values = []
    for now in (150.0, 600.0):
        strategy.clock = lambda now=now: now
        b = stand_in(1 + int((now - 100) / 10), 100.0)
        values.append((strategy.value(a), strategy.value(b)))
    assert values[0][0] > values[0][1] and values[1][0] < values[1][1]


def test_config_reaches_the_strategy_through_sglang() -> None:
    strategy = get_eviction_strategy(POLICY_NAME, {"partial": False, "ghosts": 8})
    assert isinstance(strategy, KvragCostStrategy)
    assert (strategy.partial, strategy.ghosts) == (False, 8)
    default = get_eviction_strategy(POLICY_NAME.upper(), None)
    assert (default.partial, default.ghosts) == (True, 4096)


@pytest.mark.parametrize(("config", "message"), [
    ({"decay": 2}, r"does not take 'decay'; allowed keys: ghosts, partial"),
    ({"partial": "yes"}, r"partial must be true or false, got 'yes'"),
    ({"partial": 1}, r"partial must be true or false"),
    ({"ghosts": -1}, r"ghosts must be an integer >= 0, got -1"),
    ({"ghosts": 1.5}, r"ghosts must be an integer >= 0"),
    ({"ghosts": True}, r"ghosts must be an integer >= 0, got True"),
])
def test_invalid_options_say_what_is_allowed(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_eviction_strategy(POLICY_NAME, config)


def test_server_cli_accepts_the_policy_and_its_json_options() -> None:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--radix-eviction-policy", POLICY_NAME,
                              "--radix-eviction-policy-config", '{"ghosts": 16}'])
    strategy = get_eviction_strategy(args.radix_eviction_policy,
                                     args.radix_eviction_policy_config)
    assert strategy.ghosts == 16
    with pytest.raises(SystemExit):  # the choices are enforced, so the name had to be added
        parser.parse_args(["--model-path", "m", "--radix-eviction-policy", "kvrag-nope"])


def test_registration_is_idempotent() -> None:
    register_eviction_policy()
    register_eviction_policy()
    assert RADIX_EVICTION_POLICY_CHOICES.count(POLICY_NAME) == 1
    assert _EVICTION_POLICY_FACTORIES[POLICY_NAME] == KvragCostStrategy.from_config
    for target, hook in [(eviction._RESOLVE_CORE, eviction._prefer_python_core),
                         (eviction._CLASSIC_EVICT, eviction._before_classic_evict),
                         (eviction._CLASSIC_DELETE_LEAF, eviction._before_classic_delete_leaf),
                         (eviction._UNIFIED_EVICT_LEAF, eviction._before_unified_evict_leaf),
                         (eviction._UNIFIED_EVICT_WALK, eviction._around_unified_evict_walk),
                         (eviction._UNIFIED_EVICT_VICTIM,
                          eviction._around_unified_evict_victim)]:
        assert [h for _, h, _ in HookRegistry._hooks[target]].count(hook) == 1
        assert target in HookRegistry._patched


@pytest.mark.parametrize("core", [None, "rust"])
def test_unified_cache_runs_kvrag_cost_on_the_python_core(monkeypatch, core: str | None) -> None:
    monkeypatch.delenv("SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", raising=False)
    cache, _ = make_cache("unified", POLICY_NAME, {"ghosts": 3}, core=core)
    assert type(cache.tree_core) is UnifiedTreeCore
    assert strategy_of(cache).ghosts == 3
    other, _ = make_cache("unified", "lru", core=core)  # the hook leaves other policies alone
    assert type(other.tree_core) is RustUnifiedTreeCore


@pytest.fixture
def counting_clock(monkeypatch) -> None:
    """The classic tree reads ``time.monotonic()``: a counter makes its ages exact."""
    import itertools
    import time

    from sglang.srt.mem_cache import radix_cache

    ticks = itertools.count()
    clock = SimpleNamespace(monotonic=lambda: float(next(ticks)), perf_counter=time.perf_counter)
    monkeypatch.setattr(radix_cache, "time", clock)
    monkeypatch.setattr(eviction, "time", clock)


@pytest.mark.parametrize("tree", TREES)
def test_a_stored_compressed_prefix_is_cheap_to_hold_for_what_it_saves(
        tree: str, counting_clock) -> None:
    """A compress-once entry of 20 kept slots standing for a 200-token prefix saves 10
    prompt tokens per slot on a hit; a plain 40-token prefix saves 1. Both are reused
    once, the plain one later, so lru drops the compressed one first and kvrag-cost the
    plain one. A question branch under the stored prefix is not mistaken for one."""
    from kvrag.compression import parse_spec
    from kvrag.engine_plugin.once import key_tokens, namespace

    spec = parse_spec("once:snapkv:0.9")
    stored = key_tokens(seq(7000, 200), spec, 20)
    space = namespace(spec, None)
    orders = {}
    for policy in (POLICY_NAME, "lru"):
        cache, pool = make_cache(tree, policy, {"partial": False} if policy == POLICY_NAME
                                 else None)
        for _ in range(2):
            cache.insert(InsertParams(key=RadixKey(stored, space),
                                      value=torch.tensor(seq(9000, 20))))
        cache.insert(InsertParams(key=RadixKey(array("q", [*stored, 5, 6]), space),
                                  value=torch.tensor([*seq(9000, 20), 1, 2])))
        for _ in range(2):
            insert(cache, P)
        orders[policy] = evict(cache, pool, 62)
    assert orders[POLICY_NAME] == [(1, 2), tuple(P), tuple(seq(9000, 20))]
    assert orders["lru"] == [(1, 2), tuple(seq(9000, 20)), tuple(P)]
    branch = SimpleNamespace(parent=SimpleNamespace(parent=SimpleNamespace(parent=None)),
                             key=RadixKey(list(stored) + [5, 6], space))
    assert eviction.stored_length(branch) is None
    branch.parent = branch.parent.parent  # a child of the root: the stored prefix itself
    assert eviction.stored_length(branch) == 200
