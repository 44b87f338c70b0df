"""Where a compression spec can run: one check, one refusal message per reason.

Each method declares what it needs (``Method.dynamic``, ``reconstruction``,
``uniform_layers``, ``pools_heads``, ``queries_needed``); each place that runs specs is
a ``Target`` with what it cannot do. ``check`` is the only place that compares the two.
"""

from __future__ import annotations

from enum import Enum

from kvrag.compression.spec import ONCE, CompressionSpec, SpecError


class Target(Enum):
    """A place that runs compression, named as a refusal names it."""

    HF = "the HF engine"
    PLUGIN = "the SGLang plugin"
    TRAINING = "training"


# what to do instead, where a target refuses a spec
_INSTEAD = {Target.PLUGIN: "use the HF engine", Target.TRAINING: "train with e.g. snapkv:0.5"}


def check(spec: CompressionSpec, target: Target) -> None:
    """Raise SpecError saying why ``target`` cannot run ``spec``; the HF engine runs all.

    The SGLang plugin evicts once after prefill (KVzip's reconstruction passes only for a
    corpus compressed once), and reads a shared
    compressed corpus (``once:``) with one kept count for every layer; training compresses
    each prompt with its question (KVzip's reconstruction passes run over its cache
    without gradients).
    """
    method = spec.build()
    if target is Target.HF:
        return
    if target is Target.TRAINING and spec.once:
        raise SpecError(f"{spec.name}: training compresses each prompt with its question "
                        f"(question-aware); drop {ONCE!r}")
    instead = _INSTEAD[target]
    if method.dynamic:
        raise SpecError(f"{spec.name} keeps the whole cache and picks keys per decoded token; "
                        f"{target.value} serves only methods that evict ({instead})")
    if method.reconstruction and target is Target.PLUGIN and not spec.once:
        raise SpecError(f"{spec.name} scores with reconstruction forward passes over the "
                        f"documents, which {target.value} runs for a corpus compressed once "
                        f"(use {ONCE}{spec.name}), not per question; or {instead}")
    if target is Target.PLUGIN and spec.recall is not None and not spec.recall.reprefill:
        raise SpecError(f"{spec.name}: the SGLang plugin prefills a question again over what "
                        "it recalled (reprefill=1); answering from its first prefill is "
                        "measured on the HF engine")
    if target is Target.PLUGIN and spec.once and not method.uniform_layers:
        raise SpecError(f"{spec.name}: a shared compressed corpus is read with one kept count "
                        "for every layer, and this method spreads its budget over layers; "
                        "use the HF engine, or the method per question")


def check_queries(spec: CompressionSpec, have: int | None, n: int, where: str,
                  remedy: str) -> None:
    """Raise SpecError if ``have`` captured prompt queries (None: all) are fewer than the
    method scores with over a prompt of ``n`` tokens; ``where`` keeps them, ``remedy``
    says how to keep more."""
    needed = spec.build().queries_needed()
    if have is None:
        return
    if (needed is None and have < n) or (needed is not None and have < min(needed, n)):
        raise SpecError(f"{spec.method} scores with {needed or 'all'} prompt queries but "
                        f"{where} keeps {have}; {remedy}")
