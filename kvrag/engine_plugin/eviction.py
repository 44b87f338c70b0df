"""``--radix-eviction-policy kvrag-cost``: Greedy-Dual-Size-Frequency for SGLang's radix tree.

Long corpus prefixes shared by many questions are expensive to recompute and cheap per
hit; one-off question branches are the opposite. LRU cannot tell them apart, so a burst
of questions on one corpus flushes every other corpus. This policy scores each node by
hits times recompute cost per cached token, plus GDSF's aging term (Cherkasova, 1998).

Which trees: SGLang's classic ``RadixCache`` and the unified cache's Python TreeCore both
ask ``get_priority`` for every leaf they may evict. The Rust TreeCore knows only its
built-in policy names, so :func:`register_eviction_policy` makes the unified cache pick
the Python core whenever this policy is chosen.

Options (``--radix-eviction-policy-config``, a JSON object): ``frequency_exponent`` and
``aging``, see :class:`KvragCostStrategy`.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.mem_cache.evict_policy import EvictionStrategy

logger = logging.getLogger(__name__)

POLICY_NAME = "kvrag-cost"
# Evictions whose inflation level is remembered (two float64 arrays, at most 2 MB).
HISTORY = 1 << 16
_REGISTERED = False

_RESOLVE_CORE = "sglang.srt.mem_cache.unified_cache.tree_core_registry.resolve_tree_core_backend"
_CLASSIC_DELETE_LEAF = "sglang.srt.mem_cache.radix_cache.RadixCache._delete_leaf"
_UNIFIED_EVICT_LEAF = ("sglang.srt.mem_cache.unified_cache.unified_tree_core."
                       "UnifiedTreeCore.evict_device_leaf")


@dataclass(eq=False)
class KvragCostStrategy(EvictionStrategy):
    """GDSF priority of a radix node ``n``; SGLang evicts the lowest first.

    ``H(n) = aging * L(t_n) + f_n ** frequency_exponent * c_n / s_n``, where

    - ``s_n = len(n.key)``: tokens the node holds (the memory it frees);
    - ``c_n``: cost of recomputing them, the sum of their 1-based positions in the
      sequence (attention reads the whole prefix), so ``c_n / s_n = d_n + (s_n + 1) / 2``
      with ``d_n`` the tokens above the node: the mean position of its tokens;
    - ``f_n = max(n.hit_count, 1)``: SGLang counts one hit per request that inserted a
      path through the node, its creator included (the unified tree counts none under
      HiCache write-back, leaving cost and aging);
    - ``L(t)``: the inflation level after the last eviction before time ``t``, 0 before the
      first; ``t_n = n.last_access_time``, refreshed by SGLang on every match and insert.
      Each eviction raises the level to the victim's ``H`` (it never decreases).

    Order: among evictable leaves, lowest ``(H, last_access_time)`` first, so ties go
    least recently used first; a parent becomes a candidate once its last child is gone.
    A node touched after many evictions starts from a higher ``L`` than one left idle, so
    a once-popular prefix that stops being used is eventually evicted (GDSF's aging).

    Why ``L(t_n)`` and not the current level: GDSF sets ``H`` when a node is accessed, but
    SGLang scores nodes only when it builds an eviction heap, and never scores inner nodes
    (a corpus prefix under live question branches). The strategy therefore records the
    level after every eviction, keyed by the tree's clock, and looks up the level at the
    node's last access: exactly GDSF, for the last ``HISTORY`` evictions (an older access
    reads the level from just before the oldest one kept, ageing it less than GDSF would).

    The level is raised by :meth:`on_evict`. SGLang's eviction loops tell the strategy
    nothing about victims, so :func:`register_eviction_policy` hooks the one call each
    tree makes per victim (``RadixCache._delete_leaf``, ``UnifiedTreeCore
    .evict_device_leaf``). Evictions from the host tier (HiCache) do not raise it.
    """

    frequency_exponent: float = 1.0  # 0: cost per token only (GreedyDual-Size)
    aging: float = 1.0  # weight of L: 1 is GDSF, 0 never ages a popular prefix
    level: float = field(default=0.0, init=False)  # L now
    _clocks: array = field(default_factory=lambda: array("d"), init=False, repr=False)
    _levels: array = field(default_factory=lambda: array("d"), init=False, repr=False)
    _floor: float = field(default=0.0, init=False, repr=False)  # L before _clocks[0]

    def __post_init__(self) -> None:
        for key in ("frequency_exponent", "aging"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise ValueError(f"{POLICY_NAME}: {key} must be a number, got {value!r}")
        if self.frequency_exponent < 0:
            raise ValueError(f"{POLICY_NAME}: frequency_exponent must be >= 0, "
                             f"got {self.frequency_exponent}")
        if not 0 <= self.aging <= 1:
            raise ValueError(f"{POLICY_NAME}: aging must be in [0, 1], got {self.aging}")

    @classmethod
    def from_config(cls, **config: Any) -> KvragCostStrategy:
        """Build from ``--radix-eviction-policy-config``; unknown keys name the allowed ones."""
        allowed = ("aging", "frequency_exponent")
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise ValueError(f"--radix-eviction-policy-config: {POLICY_NAME} does not take "
                             f"{', '.join(map(repr, unknown))}; allowed keys: "
                             f"{', '.join(allowed)}")
        return cls(**config)

    def get_priority(self, node: Any) -> tuple[float, float]:
        return (self.aging * self.level_at(node.last_access_time) + self.credit(node),
                node.last_access_time)

    def credit(self, node: Any) -> float:
        """``f ** frequency_exponent * c / s``: the part of ``H`` that aging does not touch.

        A compressed corpus prefix stored by compress-once (``once.py``) holds ``s`` kept
        slots but costs the prefill of its whole logical prefix ``e`` to rebuild, so its
        ``c = e (e + 1) / 2``: cheap to hold for what it saves.
        """
        from kvrag.engine_plugin.once import stored_prefix_length

        hits = max(node.hit_count, 1) ** self.frequency_exponent
        logical = stored_prefix_length(node.key)
        if logical is not None:
            return hits * logical * (logical + 1) / (2 * len(node.key))
        above = 0
        parent = node.parent
        while parent is not None:
            above += len(parent.key)
            parent = parent.parent
        size = len(node.key)
        return hits * (above + (size + 1) / 2)

    def level_at(self, clock: float) -> float:
        """``L`` after the last eviction recorded strictly before ``clock``."""
        i = bisect_left(self._clocks, clock)
        return self._levels[i - 1] if i else self._floor

    def on_evict(self, node: Any, clock: float) -> None:
        """Raise ``L`` to the victim's priority; ``clock`` reads the tree's access clock now."""
        self.level = max(self.level, self.get_priority(node)[0])
        self._clocks.append(clock)
        self._levels.append(self.level)
        if len(self._clocks) > 2 * HISTORY:
            self._floor = self._levels[HISTORY - 1]
            del self._clocks[:HISTORY], self._levels[:HISTORY]


def register_eviction_policy() -> None:
    """Add ``kvrag-cost`` to SGLang: strategy factory, CLI choice and three hooks. Idempotent.

    The hooks go through SGLang's ``HookRegistry``; ``load_plugins`` applies them after
    every plugin registered, and a direct call (a benchmark, a test) applies them here.
    Each hook does nothing unless the tree at hand uses this policy.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from sglang.srt.arg_groups.choices import (
        RADIX_EVICTION_POLICY_CHOICES,
        add_radix_eviction_policy_choices,
    )
    from sglang.srt.mem_cache import utils

    from kvrag.engine_plugin import hooks

    factory = utils._EVICTION_POLICY_FACTORIES.setdefault(POLICY_NAME,
                                                          KvragCostStrategy.from_config)
    if factory != KvragCostStrategy.from_config:
        raise ValueError(f"eviction policy {POLICY_NAME!r} is already registered by "
                         f"{factory!r}")
    if POLICY_NAME not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([POLICY_NAME])
    hooks.install([
        (_RESOLVE_CORE, _prefer_python_core, "around"),
        (_CLASSIC_DELETE_LEAF, _before_classic_delete_leaf, "before"),
        (_UNIFIED_EVICT_LEAF, _before_unified_evict_leaf, "before"),
    ])
    _REGISTERED = True


def _prefer_python_core(original, name: str, params) -> str:
    """Around ``resolve_tree_core_backend``: the Rust core cannot run a Python policy."""
    if name == "rust" and params.eviction_policy.lower() == POLICY_NAME:
        logger.info("Using the Python TreeCore: the Rust TreeCore knows only its built-in "
                    "eviction policies, not %s", POLICY_NAME)
        return "python"
    return original(name, params)


def _before_classic_delete_leaf(cache, node) -> None:
    """``RadixCache.evict`` deletes each victim with ``_delete_leaf``, and nothing else does."""
    if isinstance(cache.eviction_strategy, KvragCostStrategy):
        cache.eviction_strategy.on_evict(node, time.monotonic())  # TreeNode's clock


def _before_unified_evict_leaf(tree_core, node_id, *args, **kwargs) -> None:
    """The unified cache evicts (or demotes to host) each device victim through here."""
    if isinstance(tree_core.eviction_strategy, KvragCostStrategy):
        from sglang.srt.mem_cache.unified_cache.components.base import (
            get_and_increase_time_counter,
        )

        # The unified tree's access clock: every later access reads a larger value.
        tree_core.eviction_strategy.on_evict(tree_core.node_by_id(node_id),
                                             get_and_increase_time_counter())
