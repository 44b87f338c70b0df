"""The method base class and registry.

A method sees one layer of one prompt and returns a score per (KV head, token); higher
means keep. Engines keep the top-scoring tokens of the evictable span only, so a method
may score every token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class HeadShard:
    """Which KV heads a scorer sees: all of them, or one tensor-parallel rank's share.

    Under tensor parallelism a rank holds KV heads ``[offset, offset + local)`` of
    ``total``, and the query heads of their GQA groups. Per-head scores need nothing more;
    a method that pools over every head of the layer (TOVA) calls ``gather`` to get all
    ranks' query-head scores, in head order, so each rank picks what one rank would.
    """

    offset: int = 0
    total: int | None = None  # None: the scorer sees every KV head
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # [q_local, n] -> [q_all, n]

    def all_query_heads(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.gather is None else self.gather(scores)


WHOLE = HeadShard()


@dataclass(frozen=True)
class ScoringInput:
    """One layer of one prompt, after RoPE.

    keys:    [kv_heads, n, head_dim]
    queries: [q_heads, m, head_dim], the last m <= n prompt queries (as many as the method's
             ``queries_needed`` asks for, or more); q_heads a multiple of kv_heads (GQA)
    reconstruction: [kv_heads, n] what a reconstruction pass gave each position (the
             model, after the prompt, asked to repeat its documents: ``kvzip.py``), for
             methods with ``reconstruction``; None otherwise
    """

    keys: torch.Tensor
    queries: torch.Tensor
    layer: int
    n_layers: int
    shard: HeadShard = WHOLE
    reconstruction: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.keys.shape[1]

    @property
    def group(self) -> int:
        return self.queries.shape[0] // self.keys.shape[0]


class Method:
    """Base class: subclasses set ``name`` and override ``score``.

    What a method can do is declared here, as class attributes and ``queries_needed``,
    and read in one place, ``kvrag.compression.capabilities.check``.
    """

    name: ClassVar[str]
    #: True for methods that keep the whole cache and choose keys per decoded token.
    dynamic: ClassVar[bool] = False
    #: True for methods that score with a reconstruction pass (``ScoringInput.reconstruction``).
    reconstruction: ClassVar[bool] = False
    #: False for methods whose layers keep different counts (``layer_budgets``).
    uniform_layers: ClassVar[bool] = True
    #: True for methods that pool scores over every query head of a layer, so that under
    #: tensor parallelism a rank reads the other ranks' heads (``HeadShard.gather``).
    pools_heads: ClassVar[bool] = False

    def score(self, inp: ScoringInput) -> torch.Tensor:
        """[kv_heads, n] scores; higher is kept first."""
        raise NotImplementedError

    def queries_needed(self) -> int | None:
        """How many of the prompt's last queries ``score`` reads; None means all of them."""
        return 0

    def layer_budgets(self, keep: int, n_layers: int, n_evictable: int) -> list[int]:
        """Tokens each layer keeps; uniform unless a method spreads them (PyramidKV)."""
        return [keep] * n_layers


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"compression method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def group_mean(scores: torch.Tensor, group: int) -> torch.Tensor:
    """[q_heads, n] -> [kv_heads, n]: average the query heads that share a KV head."""
    q_heads, n = scores.shape
    return scores.view(q_heads // group, group, n).mean(dim=1)


def causal_attention(
    queries: torch.Tensor, keys: torch.Tensor, q_positions: torch.Tensor
) -> torch.Tensor:
    """Softmax attention weights [q_heads, len(q_positions), n] of the given queries.

    queries: [q_heads, m, d] at absolute positions ``q_positions``; keys: [kv_heads, n, d].
    A query attends to keys at positions up to its own.
    """
    group = queries.shape[0] // keys.shape[0]
    k = keys.repeat_interleave(group, dim=0)
    logits = queries @ k.transpose(1, 2) / keys.shape[-1] ** 0.5
    future = torch.arange(keys.shape[1], device=keys.device) > q_positions[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


ScoreFn = Callable[[ScoringInput], torch.Tensor]
