"""The engine interface every system generates through."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol, TypeVar

from kvrag.compression.spec import CompressionSpec
from kvrag.data.prompt import Prompt

K = TypeVar("K")


@dataclass(frozen=True)
class Cost:
    """What one answer cost.

    ``kv_tokens`` is what the cache held when decoding started, after any compression,
    as each engine holds it: the HF engine's per-layer tensors (their mean length where
    layers keep different counts), an SGLang pool's slots (one slot holds every layer, so
    a request holds as many as its largest layer keeps). ``kv_bytes`` is what those held,
    over all layers, read from the tensors or the pool. ``layer_mean_kv_tokens`` is the
    kept tokens averaged over layers, which differs from an SGLang ``kv_tokens`` only
    under per-layer budgets (PyramidKV). ``peak_bytes``: on CUDA, the most memory the
    process allocated during the answer's prefill and decode (None elsewhere).
    ``recalled_tokens``, ``recall_s``, ``host_kv_bytes`` (``once:...+recall``): the
    evicted corpus tokens per layer the question brought back (part of ``kv_tokens``, not
    of ``shared_kv_tokens``), the seconds choosing and copying them took, and the bytes
    of the corpus's evicted entries held in host memory (shared by the corpus's
    questions, outside the device's KV).
    ``served_uncompressed``: the system asked for compression with a budget at or above the
    documents' length, so there was nothing to evict and the full cache answered.
    ``attended_tokens`` is what each decoded token attends to at most: ``kv_tokens``
    unless a dynamic method (retrieval attention) reads only part of the cache.
    ``doc_tokens`` is how many prompt tokens are documents (what compression may evict).
    ``prefill_s`` is the prompt's prefill, which systems answering the same prompt share.
    ``prefill_tokens`` is how many prompt tokens this answer computed: all of them, or only
    the question's where a cached corpus prefix (a radix hit, a ``once:`` cache) covered
    the rest. ``shared_kv_tokens`` is the part of ``kv_tokens`` that every question over
    the same corpus can share: the corpus prefix for a full cache, its kept tokens for
    ``once:``, nothing for per-question compression (its kept tokens depend on the
    question).
    """

    prompt_tokens: int
    kv_tokens: float
    kv_bytes: int
    prefill_s: float
    decode_s: float
    new_tokens: int
    compress_s: float = 0.0
    attended_tokens: float | None = None
    doc_tokens: int | None = None
    prefill_tokens: int | None = None
    shared_kv_tokens: float = 0.0
    layer_mean_kv_tokens: float | None = None
    peak_bytes: int | None = None
    served_uncompressed: bool = False
    recalled_tokens: float = 0.0
    recall_s: float = 0.0
    host_kv_bytes: int = 0

    @property
    def latency_s(self) -> float:
        return self.prefill_s + self.compress_s + self.recall_s + self.decode_s

    def to_json(self) -> dict:
        return asdict(self) | {"latency_s": self.latency_s}


@dataclass(frozen=True)
class Generation:
    """``truncated``: generation stopped at the token limit, not at a stop token."""

    text: str
    cost: Cost
    truncated: bool


class Engine(Protocol):
    """Greedy generation from one prompt, with its cost, optionally from a compressed cache.

    Every method here is one the callers use; an engine that has nothing to do for one
    (``release`` on a server that keeps no prefill for the caller) still has it.
    """

    name: str
    model_name: str
    #: compressed requests asked again alone because the engine could not compress them
    #: among others (SGLang under a full pool); 0 elsewhere
    retried_alone: int

    def generate(
        self, prompt: Prompt, max_new_tokens: int, compression: CompressionSpec | None = None
    ) -> Generation: ...

    def generate_many(
        self, jobs: Iterable[tuple[K, Prompt, CompressionSpec | None]], max_new_tokens: int,
        concurrency: int,
    ) -> Iterator[tuple[K, Generation]]:
        """Up to ``concurrency`` jobs in flight; each (key, answer) as it lands."""
        ...

    def release(self) -> None:
        """The caller is done with the prompt last answered: drop what was kept for it."""
        ...

    def close(self) -> None: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no special tokens), for budgets and chunking."""
        ...
