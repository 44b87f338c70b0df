"""The engine interface every system generates through."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

from kvrag.data.prompt import Prompt


@dataclass(frozen=True)
class Cost:
    """What one answer cost.

    ``kv_tokens`` is the number of tokens whose keys and values the cache held when
    decoding started (after any compression); ``kv_bytes`` is their size over all layers.
    """

    prompt_tokens: int
    kv_tokens: int
    kv_bytes: int
    prefill_s: float
    decode_s: float
    new_tokens: int

    @property
    def latency_s(self) -> float:
        return self.prefill_s + self.decode_s

    def to_json(self) -> dict:
        return asdict(self) | {"latency_s": self.latency_s}


@dataclass(frozen=True)
class Generation:
    text: str
    cost: Cost


class Engine(Protocol):
    """Greedy generation from one prompt, with its cost."""

    name: str
    model_name: str

    def generate(self, prompt: Prompt, max_new_tokens: int) -> Generation: ...
