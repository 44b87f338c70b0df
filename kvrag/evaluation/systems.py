"""The systems a comparison runs side by side, behind a registry keyed by spec prefix.

A system spec is a string such as ``full``; later systems take a parameter after a
colon or at-sign (``snapkv:0.5``, ``rag:2048``). Every system answers through the same
engine and the same prompt builder, so only what the system changes differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvrag.data.prompt import Prompt, build_prompt
from kvrag.data.schema import Instance
from kvrag.engines.base import Engine, Generation


@dataclass(frozen=True)
class Answer:
    prompt: Prompt
    generation: Generation


class System(Protocol):
    name: str

    def answer(self, instance: Instance, engine: Engine, max_new_tokens: int) -> Answer: ...


class SystemSpecError(ValueError):
    """A system spec that names no registered system or has a bad parameter."""


SystemFactory = Callable[[str | None], System]
SYSTEMS: dict[str, SystemFactory] = {}
SYSTEM_HELP: dict[str, str] = {}


def register_system(prefix: str, usage: str) -> Callable[[SystemFactory], SystemFactory]:
    def wrap(factory: SystemFactory) -> SystemFactory:
        if prefix in SYSTEMS:
            raise ValueError(f"system {prefix!r} is already registered")
        SYSTEMS[prefix] = factory
        SYSTEM_HELP[prefix] = usage
        return factory

    return wrap


@dataclass(frozen=True)
class FullContext:
    """The whole corpus in the prompt, full KV cache."""

    name: str = "full"

    def answer(self, instance: Instance, engine: Engine, max_new_tokens: int) -> Answer:
        prompt = build_prompt(instance)
        return Answer(prompt, engine.generate(prompt, max_new_tokens))


@register_system("full", "full")
def _full(param: str | None) -> System:
    if param is not None:
        raise SystemSpecError("'full' takes no parameter")
    return FullContext()


def parse_system(spec: str) -> System:
    spec = spec.strip()
    prefix, param = spec, None
    for sep in (":", "@"):
        if sep in spec:
            prefix, param = spec.split(sep, 1)
            break
    if prefix not in SYSTEMS:
        known = ", ".join(SYSTEM_HELP[p] for p in sorted(SYSTEMS))
        raise SystemSpecError(f"unknown system {spec!r}; known systems: {known}")
    return SYSTEMS[prefix](param)


def parse_systems(specs: str) -> list[System]:
    """Parse a comma-separated list, refusing empty entries and duplicates."""
    names = [s.strip() for s in specs.split(",")]
    if not all(names):
        raise SystemSpecError(f"empty system name in {specs!r}")
    systems = [parse_system(s) for s in names]
    dupes = sorted({s.name for s in systems if [t.name for t in systems].count(s.name) > 1})
    if dupes:
        raise SystemSpecError(f"system(s) listed twice: {', '.join(dupes)}")
    return systems
