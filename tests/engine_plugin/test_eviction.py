"""kvrag-cost on SGLang's own radix trees (classic RadixCache and the unified Python core).

No engine: the trees run with an allocator stand-in that records every segment SGLang
frees, so eviction order is read from the tree's frees, not from the strategy.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
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


# kvrag-cost, by hand: H(B) = 1 * (0 + 9/2) = 4.5; H(Q) = 1 * (40 + 5/2) = 42.5;
# H(P) = 5 * (0 + 41/2) = 102.5 once it is a leaf. No eviction before any access, so L = 0
# for all of them. Equal H goes least recently used first.
KVRAG_ORDER = [*BS, *QS, P]
# lru: questions oldest first; P was last touched by Q4's insert, before B0 and B1.
LRU_ORDER = [*QS, P, *BS]


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize(("policy", "order"), [(POLICY_NAME, KVRAG_ORDER), ("lru", LRU_ORDER)])
def test_eviction_order_on_hand_built_tree(tree: str, policy: str, order: list) -> None:
    cache, pool = make_cache(tree, policy)
    build_tree(cache)
    assert evict(cache, pool, TOTAL) == [tuple(x) for x in order]


@pytest.mark.parametrize("tree", TREES)
def test_short_one_off_branches_go_before_the_shared_prefix_and_its_questions(tree: str) -> None:
    kvrag, kvrag_pool = make_cache(tree, POLICY_NAME)
    lru, lru_pool = make_cache(tree, "lru")
    for cache in (kvrag, lru):
        build_tree(cache)
    assert evict(kvrag, kvrag_pool, 16) == [tuple(b) for b in BS]
    assert evict(lru, lru_pool, 16) == [tuple(q) for q in QS[:4]]
    # The level L follows the victims: two branches of H 4.5.
    assert strategy_of(kvrag).level == 4.5


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize(("aging", "victims"), [
    # X_k arrives after k - 1 evictions: H = 6.5 * (k - 1) + 6.5 overtakes P's 16.5 at k = 3.
    (1.0, ["X1", "X2", "P"]),
    (0.0, ["X1", "X2", "X3", "X4"]),
])
def test_aging_evicts_a_popular_prefix_that_stopped_being_used(
        tree: str, aging: float, victims: list[str]) -> None:
    cache, pool = make_cache(tree, POLICY_NAME, {"aging": aging})
    prefix = seq(500, 10)
    for _ in range(3):
        insert(cache, prefix)  # 3 hits: H = 3 * (0 + 11/2) = 16.5
    names = {tuple(prefix): "P"}
    seen = []
    for k in range(1, len(victims) + 1):
        branch = seq(10_000 + 100 * k, 12)  # 1 hit: credit 13/2 = 6.5
        names[tuple(branch)] = f"X{k}"
        insert(cache, branch)
        seen += [names[segment] for segment in evict(cache, pool, 1)]
    assert seen == victims


def node(size: int, hits: int, clock: float, above: tuple[int, ...] = ()) -> SimpleNamespace:
    """A stand-in for a tree node: the attributes the strategy reads, on a path of ancestors."""
    parent = SimpleNamespace(key=[], parent=None)  # root
    for length in above:
        parent = SimpleNamespace(key=[0] * length, parent=parent)
    return SimpleNamespace(key=[0] * size, parent=parent, hit_count=hits, last_access_time=clock)


# Two evictions: victim H 4.5 at clock 10, then victim H 42.5 at clock 20.
EVICTIONS = [(node(8, 1, 1.0), 10.0), (node(4, 1, 2.0, above=(40,)), 20.0)]


@pytest.mark.parametrize(("options", "target", "expected"), [
    ({}, node(8, 1, 5.0), 4.5),                                   # 0 + 1 * (0 + 4.5)
    ({}, node(4, 1, 5.0, above=(32, 8)), 42.5),                    # 0 + 1 * (40 + 2.5)
    ({}, node(40, 5, 5.0), 102.5),                                 # 0 + 5 * 20.5
    ({}, node(8, 0, 5.0), 4.5),                                    # 0 hits count as 1
    ({"frequency_exponent": 0.5}, node(40, 4, 5.0), 41.0),         # 0 + 2 * 20.5
    ({"frequency_exponent": 0.0}, node(40, 5, 5.0), 20.5),         # 0 + 1 * 20.5
    ({}, node(8, 1, 15.0), 9.0),                                   # 4.5 + 4.5
    ({}, node(8, 1, 20.0), 9.0),                                   # 20 is not before 20
    ({}, node(8, 2, 25.0), 51.5),                                  # 42.5 + 2 * 4.5
    ({"aging": 0.5}, node(8, 1, 25.0), 25.75),                     # 0.5 * 42.5 + 4.5
    ({"aging": 0.0}, node(8, 1, 25.0), 4.5),
])
def test_priority_formula(options: dict, target: SimpleNamespace, expected: float) -> None:
    strategy = KvragCostStrategy(**options)
    for victim, clock in EVICTIONS:
        strategy.on_evict(victim, clock)
    assert strategy.get_priority(target) == (pytest.approx(expected), target.last_access_time)


def test_level_never_decreases_and_old_history_is_dropped(monkeypatch) -> None:
    monkeypatch.setattr(eviction, "HISTORY", 2)
    strategy = KvragCostStrategy()
    for clock, size in enumerate([2, 4, 6, 2, 8], start=1):  # victim H = (size + 1) / 2
        strategy.on_evict(node(size, 1, 0.0), float(clock))
    assert strategy.level == 4.5
    # The 5th entry overflowed 2 * HISTORY: the two oldest (levels 1.5, 2.5) are forgotten,
    # and accesses before the oldest remembered eviction read the last forgotten level.
    assert [strategy.level_at(t) for t in (0.5, 3.5, 4.5, 9.0)] == [2.5, 3.5, 3.5, 4.5]


def test_config_reaches_the_strategy_through_sglang() -> None:
    strategy = get_eviction_strategy(POLICY_NAME, {"frequency_exponent": 0.5, "aging": 0})
    assert isinstance(strategy, KvragCostStrategy)
    assert (strategy.frequency_exponent, strategy.aging) == (0.5, 0)
    default = get_eviction_strategy(POLICY_NAME.upper(), None)
    assert (default.frequency_exponent, default.aging) == (1.0, 1.0)


@pytest.mark.parametrize(("config", "message"), [
    ({"decay": 2}, r"does not take 'decay'; allowed keys: aging, frequency_exponent"),
    ({"aging": 1.5}, r"aging must be in \[0, 1\], got 1.5"),
    ({"aging": -0.1}, r"aging must be in \[0, 1\]"),
    ({"frequency_exponent": -1}, r"frequency_exponent must be >= 0"),
    ({"frequency_exponent": "1"}, r"frequency_exponent must be a number, got '1'"),
    ({"aging": True}, r"aging must be a number, got True"),
    ({"frequency_exponent": math.nan}, r"frequency_exponent must be a number"),
])
def test_invalid_options_say_what_is_allowed(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_eviction_strategy(POLICY_NAME, config)


def test_server_cli_accepts_the_policy_and_its_json_options() -> None:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--radix-eviction-policy", POLICY_NAME,
                              "--radix-eviction-policy-config", '{"aging": 0.25}'])
    strategy = get_eviction_strategy(args.radix_eviction_policy,
                                     args.radix_eviction_policy_config)
    assert strategy.aging == 0.25
    with pytest.raises(SystemExit):  # the choices are enforced, so the name had to be added
        parser.parse_args(["--model-path", "m", "--radix-eviction-policy", "kvrag-nope"])


def test_registration_is_idempotent() -> None:
    register_eviction_policy()
    register_eviction_policy()
    assert RADIX_EVICTION_POLICY_CHOICES.count(POLICY_NAME) == 1
    assert _EVICTION_POLICY_FACTORIES[POLICY_NAME] == KvragCostStrategy.from_config
    for target, hook in [(eviction._RESOLVE_CORE, eviction._prefer_python_core),
                         (eviction._CLASSIC_DELETE_LEAF, eviction._before_classic_delete_leaf),
                         (eviction._UNIFIED_EVICT_LEAF, eviction._before_unified_evict_leaf)]:
        assert [h for _, h, _ in HookRegistry._hooks[target]].count(hook) == 1
        assert target in HookRegistry._patched


@pytest.mark.parametrize("core", [None, "rust"])
def test_unified_cache_runs_kvrag_cost_on_the_python_core(monkeypatch, core: str | None) -> None:
    monkeypatch.delenv("SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", raising=False)
    cache, _ = make_cache("unified", POLICY_NAME, {"aging": 0.5}, core=core)
    assert type(cache.tree_core) is UnifiedTreeCore
    assert strategy_of(cache).aging == 0.5
    other, _ = make_cache("unified", "lru", core=core)  # the hook leaves other policies alone
    assert type(other.tree_core) is RustUnifiedTreeCore


@pytest.mark.parametrize("tree", TREES)
def test_a_stored_compressed_prefix_is_cheap_to_hold_for_what_it_saves(tree: str) -> None:
    """A compress-once entry of 20 kept slots standing for a 200-token prefix: kvrag-cost
    scores it by the prefill it saves, 200 * 201 / 2 over 20 slots = 1005, so a plain
    40-token prefix (41/2 = 20.5) goes first although it was used later; lru drops the
    older compressed one."""
    from kvrag.compression import parse_spec
    from kvrag.engine_plugin.once import key_tokens, namespace

    spec = parse_spec("once:snapkv:0.9")
    stored = key_tokens(seq(7000, 200), spec, 20)
    orders = {}
    for policy in (POLICY_NAME, "lru"):
        cache, pool = make_cache(tree, policy)
        cache.insert(InsertParams(key=RadixKey(stored, namespace(spec, None)),
                                  value=torch.tensor(seq(9000, 20))))
        insert(cache, P)
        orders[policy] = evict(cache, pool, 60)
    assert orders[POLICY_NAME] == [tuple(P), tuple(seq(9000, 20))]
    assert orders["lru"] == [tuple(seq(9000, 20)), tuple(P)]
