"""The systems a comparison runs side by side, behind a registry keyed by spec prefix.

A system spec is a string: ``full``, a compression spec (``snapkv:0.5`` removes half the
document tokens from the cache, ``snapkv@512`` keeps 512), and later ``rag:BUDGET``. The
part before ``:`` or ``@`` picks the factory. Every system answers through the same
engine and the same prompt builder, so only what the system changes differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvrag.compression import METHODS, CompressionSpec, SpecError, parse_spec
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


SystemFactory = Callable[[str], System]
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
def _full(spec: str) -> System:
    if spec != "full":
        raise SystemSpecError("'full' takes no parameter")
    return FullContext()


@dataclass(frozen=True)
class CompressedContext:
    """The whole corpus in the prompt; the documents' KV cache compressed after prefill."""

    spec: CompressionSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def answer(self, instance: Instance, engine: Engine, max_new_tokens: int) -> Answer:
        prompt = build_prompt(instance)
        return Answer(prompt, engine.generate(prompt, max_new_tokens, compression=self.spec))


def _compressed(spec: str) -> System:
    try:
        return CompressedContext(parse_spec(spec))
    except SpecError as e:
        raise SystemSpecError(str(e)) from None


for _method in METHODS:
    register_system(_method, f"{_method}:RATIO|@TOKENS")(_compressed)


def parse_system(spec: str) -> System:
    spec = spec.strip()
    prefix = spec.split(":", 1)[0].split("@", 1)[0]
    if prefix not in SYSTEMS:
        known = ", ".join(SYSTEM_HELP[p] for p in sorted(SYSTEMS))
        raise SystemSpecError(f"unknown system {spec!r}; known systems: {known}")
    return SYSTEMS[prefix](spec)


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
