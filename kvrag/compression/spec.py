"""Compression spec strings: ``METHOD:RATIO`` or ``METHOD@TOKENS``, optionally ``once:``.

RATIO is the fraction of evictable (document) tokens removed, 0 <= RATIO < 1, the kvpress
convention; TOKENS is an absolute number of document tokens kept.

``once:METHOD:RATIO`` compresses the corpus prefix (system turn, header, documents) once,
before any question is seen, and answers every question over that corpus from the same
compressed cache. Its scoring is question-agnostic: the methods that score with the
prompt's last queries (SnapKV's observation window, TOVA's last token) see the corpus
tail instead of the question, kvpress's convention. Without ``once:`` the whole prompt,
question included, is prefilled before the documents are compressed (question-aware).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from kvrag.compression.base import METHODS, Method


class SpecError(ValueError):
    """A spec that names no method or an impossible ratio/budget; says what is allowed."""


ONCE = "once:"


def _usage() -> str:
    return (f"use METHOD:RATIO with 0 <= RATIO < 1 (fraction of document tokens removed) or "
            f"METHOD@TOKENS with TOKENS >= 1 (document tokens kept), either optionally "
            f"prefixed with {ONCE} (compress the corpus once for all its questions); methods: "
            f"{', '.join(sorted(METHODS))}")


@dataclass(frozen=True)
class CompressionSpec:
    method: str
    ratio: float | None = None
    budget: int | None = None
    once: bool = False  # compress the corpus prefix once, before any question

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"unknown compression method {self.method!r}; {_usage()}")
        if (self.ratio is None) == (self.budget is None):
            raise SpecError(f"give exactly one of a ratio or a budget; {_usage()}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise SpecError(f"ratio {self.ratio} is out of range; {_usage()}")
        if self.budget is not None and self.budget < 1:
            raise SpecError(f"budget {self.budget} is out of range; {_usage()}")
        if self.once and self.build().dynamic:
            raise SpecError(f"{self.method} keeps the whole cache and picks keys per decoded "
                            f"token, so there is nothing to compress once; drop {ONCE!r}")

    @property
    def name(self) -> str:
        # repr: the shortest text that reads back as the same float, so no two ratios collide
        base = f"{self.method}:{self.ratio!r}" if self.ratio is not None else \
            f"{self.method}@{self.budget}"
        return ONCE + base if self.once else base

    def build(self) -> Method:
        return METHODS[self.method]()

    def kept(self, n_evictable: int) -> int:
        """How many of ``n_evictable`` document tokens this spec keeps."""
        if self.budget is not None:
            return min(self.budget, n_evictable)
        assert self.ratio is not None
        return n_evictable - int(round(n_evictable * self.ratio))


def queries_needed(specs: Iterable[CompressionSpec]) -> int | None:
    """The most prompt queries any of ``specs`` scores with (None: all of them)."""
    needed = [spec.build().queries_needed() for spec in specs]
    return None if None in needed else max(needed, default=0)


def parse_spec(text: str) -> CompressionSpec:
    text = text.strip()
    if text.startswith(ONCE):
        return replace(parse_spec(text[len(ONCE):]), once=True)
    for sep in (":", "@"):
        if sep in text:
            method, value = text.split(sep, 1)
            try:
                number = float(value) if sep == ":" else int(value)
            except ValueError:
                raise SpecError(f"cannot read {value!r} in {text!r}; {_usage()}") from None
            if sep == ":":
                return CompressionSpec(method, ratio=float(number))
            return CompressionSpec(method, budget=int(number))
    raise SpecError(f"{text!r} has no ratio or budget; {_usage()}")
