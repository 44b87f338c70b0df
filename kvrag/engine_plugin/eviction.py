"""``--radix-eviction-policy kvrag-cost``: evict the prefix least likely to be reused soon.

Belady's MIN evicts what is needed furthest in the future. kvrag-cost predicts that from
each node's own history: a node reused often since it was first cached will be reused
soon again, so the node with the lowest reuse rate goes first. Long corpus prefixes
shared by many questions outlive one-off question branches (never reused: rate 0), and a
corpus that stops being asked about loses its rate as its idle time grows, so a shift in
popularity is followed without a tuned decay.

Two additions make it work with a tree of whole corpora:

- **Ghosts.** The history of an evicted node (hits, when first cached) is remembered in
  a bounded table, as ARC remembers evicted pages. When the same prefix is cached again
  under the same parent, it gets its record back: a popular corpus flushed by a burst of
  questions on another one is not mistaken for a new one.
- **Partial eviction.** SGLang frees whole leaves, so a request that needs 500 slots can
  evict a 3,000-token corpus. kvrag-cost splits the last victim of an eviction and frees
  only the tail the request needs; the rest stays cached and still matches.

Which trees: SGLang's unified cache (the engine's tree) with its Python TreeCore, and
the classic ``RadixCache`` (pure sliding-window models) without partial eviction. The
Rust TreeCore knows only its built-in policy names, so :func:`register_eviction_policy`
makes the unified cache pick the Python core whenever this policy is chosen.

Options (``--radix-eviction-policy-config``, a JSON object): ``partial`` and
``ghosts``, see :class:`KvragCostStrategy`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.mem_cache.evict_policy import EvictionStrategy

logger = logging.getLogger(__name__)

POLICY_NAME = "kvrag-cost"

_RESOLVE_CORE = "sglang.srt.mem_cache.unified_cache.tree_core_registry.resolve_tree_core_backend"
_CLASSIC_EVICT = "sglang.srt.mem_cache.radix_cache.RadixCache.evict"
_CLASSIC_DELETE_LEAF = "sglang.srt.mem_cache.radix_cache.RadixCache._delete_leaf"
_UNIFIED_EVICT_LEAF = ("sglang.srt.mem_cache.unified_cache.unified_tree_core."
                       "UnifiedTreeCore.evict_device_leaf")
_UNIFIED_EVICT_WALK = ("sglang.srt.mem_cache.unified_radix_cache."
                       "UnifiedRadixCache._evict_components")
_UNIFIED_EVICT_VICTIM = ("sglang.srt.mem_cache.unified_radix_cache."
                         "UnifiedRadixCache._evict_device_leaf")


def _unified_clock() -> float:
    """The unified tree's access clock (a counter), which its nodes' times read."""
    from sglang.srt.mem_cache.unified_cache.components import base

    return base._LAST_ACCESS_TIME_COUNTER_FLOAT


@dataclass(eq=False)
class KvragCostStrategy(EvictionStrategy):
    """Priority of a radix node ``n`` (SGLang evicts the lowest first): ``(value, last access)``.

    ``value(n) = max(h - 1, 0) / (now - c) * e / s``, where

    - ``h``: SGLang's ``hit_count``, one per request that inserted a path through the
      node, its creator included (so ``h - 1`` reuses). The unified tree counts none
      under HiCache write-back, where every value is 0 and the order is LRU;
    - ``c``: the node's ``creation_time`` (the unified tree keeps it when it splits a
      node; the classic tree's split restarts it); with a ghost, the hits and creation
      time of the same prefix's earlier nodes;
    - ``now``: the tree's clock (the unified tree's access counter, or
      ``time.monotonic()`` for the classic tree);
    - ``e / s``: prompt tokens a hit saves per slot the node holds: 1 for an ordinary
      node; for a compressed corpus prefix stored by compress-once (``once.py``), its
      logical length over its kept slots, so it is cheap to hold for what it saves.

    Ties (every one-off branch has value 0) go least recently used first. A parent
    becomes a candidate once its last child is gone.

    Options: ``partial`` (default true) frees only the tail of the last victim that an
    eviction needs, in the unified tree; ``ghosts`` (default 4096, 0 disables) is how
    many evicted nodes' histories are remembered, oldest forgotten first.
    """

    partial: bool = True
    ghosts: int = 4096
    clock: Callable[[], float] = field(init=False, repr=False)  # the tree's clock
    _ghosts: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.clock = _unified_clock
        if not isinstance(self.partial, bool):
            raise ValueError(f"{POLICY_NAME}: partial must be true or false, "
                             f"got {self.partial!r}")
        if isinstance(self.ghosts, bool) or not isinstance(self.ghosts, int) \
                or self.ghosts < 0:
            raise ValueError(f"{POLICY_NAME}: ghosts must be an integer >= 0, "
                             f"got {self.ghosts!r}")

    @classmethod
    def from_config(cls, **config: Any) -> KvragCostStrategy:
        """Build from ``--radix-eviction-policy-config``; unknown keys name the allowed ones."""
        allowed = ("ghosts", "partial")
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise ValueError(f"--radix-eviction-policy-config: {POLICY_NAME} does not take "
                             f"{', '.join(map(repr, unknown))}; allowed keys: "
                             f"{', '.join(allowed)}")
        return cls(**config)

    def get_priority(self, node: Any) -> tuple[float, float]:
        return self.value(node), node.last_access_time

    def value(self, node: Any) -> float:
        hits, created = self.history(node)
        age = self.clock() - created
        rate = max(hits - 1, 0) / age if age > 0 else 0.0
        if rate == 0.0:
            return 0.0
        logical = stored_length(node)
        return rate * logical / len(node.key) if logical is not None else rate

    def history(self, node: Any) -> tuple[float, float]:
        """``(h, c)``: the node's hits and creation time, with its ghost's added."""
        hits, created = node.hit_count, node.creation_time
        ghost = (self._ghosts.get(_ghost_key(node))
                 if self.ghosts and node.parent is not None else None)
        if ghost is not None and ghost[1] < created:
            hits += ghost[0]
            created = ghost[1]
        return hits, created

    def on_evict(self, node: Any) -> None:
        """Remember the victim's history; called by the trees' hooks before it goes."""
        if not self.ghosts or node.parent is None or not len(node.key):
            return
        key = _ghost_key(node)
        self._ghosts[key] = self.history(node)
        self._ghosts.move_to_end(key)
        if len(self._ghosts) > self.ghosts:
            self._ghosts.popitem(last=False)


def _ghost_key(node: Any) -> tuple[int, Any]:
    """A prefix cached again under the same parent starts with the same token."""
    return node.parent.id, node.key.token_ids[0]


def stored_length(node: Any) -> int | None:
    """The logical length of the compressed corpus prefix a node stores, else None."""
    from kvrag.engine_plugin.once import stored_prefix_length

    # A stored prefix is a child of the root; its question branches share its namespace.
    if node.parent is None or node.parent.parent is not None:
        return None
    return stored_prefix_length(node.key)


def register_eviction_policy() -> None:
    """Add ``kvrag-cost`` to SGLang: strategy factory, CLI choice and its hooks. Idempotent.

    The hooks go through SGLang's ``HookRegistry``; ``load_plugins`` applies them after
    every plugin registered, and a direct call (a benchmark, a test) applies them here.
    Each hook does nothing unless the tree at hand uses this policy.
    """
    from sglang.srt.arg_groups.choices import (
        RADIX_EVICTION_POLICY_CHOICES,
        add_radix_eviction_policy_choices,
    )
    from sglang.srt.mem_cache import utils

    from kvrag.engine_plugin import hooks

    if utils._EVICTION_POLICY_FACTORIES.get(POLICY_NAME) == KvragCostStrategy.from_config:
        return  # registered in this process already
    factory = utils._EVICTION_POLICY_FACTORIES.setdefault(POLICY_NAME,
                                                          KvragCostStrategy.from_config)
    if factory != KvragCostStrategy.from_config:
        raise ValueError(f"eviction policy {POLICY_NAME!r} is already registered by "
                         f"{factory!r}")
    if POLICY_NAME not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([POLICY_NAME])
    hooks.install([
        (_RESOLVE_CORE, _prefer_python_core, "around"),
        (_CLASSIC_EVICT, _before_classic_evict, "before"),
        (_CLASSIC_DELETE_LEAF, _before_classic_delete_leaf, "before"),
        (_UNIFIED_EVICT_LEAF, _before_unified_evict_leaf, "before"),
        (_UNIFIED_EVICT_WALK, _around_unified_evict_walk, "around"),
        (_UNIFIED_EVICT_VICTIM, _around_unified_evict_victim, "around"),
    ])


def _prefer_python_core(original, name: str, params) -> str:
    """Around ``resolve_tree_core_backend``: the Rust core cannot run a Python policy."""
    if name == "rust" and params.eviction_policy.lower() == POLICY_NAME:
        logger.info("Using the Python TreeCore: the Rust TreeCore knows only its built-in "
                    "eviction policies, not %s", POLICY_NAME)
        return "python"
    return original(name, params)


def _before_classic_evict(cache, *args, **kwargs) -> None:
    """The classic tree's nodes read ``time.monotonic()``."""
    if isinstance(cache.eviction_strategy, KvragCostStrategy):
        cache.eviction_strategy.clock = time.monotonic


def _before_classic_delete_leaf(cache, node) -> None:
    """``RadixCache.evict`` deletes each victim with ``_delete_leaf``, and nothing else does."""
    if isinstance(cache.eviction_strategy, KvragCostStrategy):
        cache.eviction_strategy.on_evict(node)


def _before_unified_evict_leaf(tree_core, node_id, *args, **kwargs) -> None:
    """The unified cache evicts (or demotes to host) each device victim through here."""
    if isinstance(getattr(tree_core, "eviction_strategy", None), KvragCostStrategy):
        tree_core.eviction_strategy.on_evict(tree_core.node_by_id(node_id))


def _around_unified_evict_walk(original, cache, request_by_type, tracker,
                               available_size_targets=None, **kwargs) -> None:
    """Around ``UnifiedRadixCache._evict_components``: note what the walk must free.

    A plain ``evict`` names a token count; an allocation names a free-size target
    (``evict_for_alloc``). A walk stopped by the allocator's own predicate says neither,
    and its victims are evicted whole.
    """
    strategy = getattr(cache.tree_core, "eviction_strategy", None)  # the Rust core has none
    if not (isinstance(strategy, KvragCostStrategy) and strategy.partial) \
            or kwargs.get("allocation_reclaim_satisfied") is not None:
        return original(cache, request_by_type, tracker, available_size_targets, **kwargs)
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

    full = ComponentType.FULL
    target = (available_size_targets or {}).get(full)
    if target is not None:
        component, size = target
        cache._kvrag_still_needed = \
            lambda: size - cache._component_available_size(component)
    else:
        cache._kvrag_still_needed = lambda: request_by_type.get(full, 0) - tracker[full]
    try:
        return original(cache, request_by_type, tracker, available_size_targets, **kwargs)
    finally:
        cache._kvrag_still_needed = None


def _around_unified_evict_victim(original, cache, node_id, tracker):
    """Around ``UnifiedRadixCache._evict_device_leaf``: free only the tail it needs.

    The victim is split where the kept part ends (a page boundary); the split keeps the
    victim's id on the tail, which the original then evicts, and leaves the head cached
    with the victim's hits, creation and access times.
    """
    needed = getattr(cache, "_kvrag_still_needed", None)
    if needed is not None:
        _trim_victim(cache, cache.tree_core.node_by_id(node_id), needed())
    return original(cache, node_id, tracker)


def _trim_victim(cache, node, needed: int) -> None:
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

    core = cache.tree_core
    page = core.page_size
    keep = (len(node.key) - needed) // page * page
    if needed <= 0 or keep <= 0 or cache.tree_components != (ComponentType.FULL,) \
            or node.backuped or core.is_host_memory_buffer_only \
            or node.write_through_pending_id is not None \
            or node.load_back_pending_id is not None or stored_length(node) is not None:
        return
    accessed = node.last_access_time
    head, action = core._split_node(node.key, node, keep)
    assert action is None, "a node without host state needs no backup bookkeeping"
    head.last_access_time = node.last_access_time = accessed  # a split is not an access

