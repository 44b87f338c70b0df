"""The systems a comparison runs side by side, behind a registry keyed by spec prefix.

A system spec is a string: ``full``, a compression spec (``snapkv:0.5`` removes half the
document tokens from the cache, ``snapkv@512`` keeps 512, ``once:snapkv:0.5`` compresses
each corpus once for all its questions, ``snapkv[chunk=16]:0.5`` keeps whole 16-token
chunks), or ``rag:BUDGET``. The part before ``[``, ``:`` or ``@`` picks the factory; a list
of specs splits on the commas outside brackets. Every system answers through the same
engine and the same prompt builder, so only what the system changes differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvrag.compression import METHODS, CompressionSpec, SpecError, parse_spec, split_specs
from kvrag.compression.spec import parse_options
from kvrag.data.prompt import Prompt, build_prompt
from kvrag.data.schema import Doc, Instance
from kvrag.engines.base import Engine
from kvrag.extras import require
from kvrag.rag_stack.config import RETRIEVER_NAMES, RagConfig

if TYPE_CHECKING:
    from kvrag.rag_stack.pipeline import RagPipeline


@dataclass(frozen=True)
class Request:
    """What a system asks the engine for one question: the prompt and its compression."""

    prompt: Prompt
    compression: CompressionSpec | None = None
    extra: dict = field(default_factory=dict)  # system-specific fields for the record


@dataclass
class SystemOptions:
    """Settings some systems need, shared by all systems of a run."""

    rag: RagConfig = field(default_factory=RagConfig)
    corpus: Sequence[Doc] | None = None  # the dataset's shared corpus, which rag retrieves from
    _pipeline: RagPipeline | None = None

    def rag_pipeline(self) -> RagPipeline:
        """One pipeline (Chroma client, embedding model) for every rag system of the run."""
        if self._pipeline is None:
            require("rag", "a rag system")
            from kvrag.rag_stack.pipeline import RagPipeline

            self._pipeline = RagPipeline.from_config(self.rag)
        return self._pipeline


class System(Protocol):
    name: str

    def request(self, instance: Instance, engine: Engine) -> Request: ...


class SystemSpecError(ValueError):
    """A system spec that names no registered system or has a bad parameter."""


SystemFactory = Callable[[str, SystemOptions], System]
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

    def request(self, instance: Instance, engine: Engine) -> Request:
        return Request(build_prompt(instance))


@register_system("full", "full")
def _full(spec: str, options: SystemOptions) -> System:
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

    def request(self, instance: Instance, engine: Engine) -> Request:
        return Request(build_prompt(instance), self.spec)


def _compressed(spec: str, options: SystemOptions) -> System:
    try:
        return CompressedContext(parse_spec(spec))
    except SpecError as e:
        raise SystemSpecError(str(e)) from None


for _method in METHODS:
    _options = "" if METHODS[_method].dynamic else "[OPTIONS]"
    register_system(_method, f"{_method}{_options}:RATIO|@TOKENS")(_compressed)
# the corpus compressed once, question-agnostic, for all its questions (spec.py)
register_system("once", "once:METHOD:RATIO|@TOKENS[+recall@TOKENS|:SHARE]")(_compressed)


@dataclass(frozen=True)
class RagSystem:
    """Retrieve the best chunks for this question up to ``budget`` tokens, from the
    dataset's shared corpus where it has one, else from the question's own documents; same
    prompt and engine. ``retriever``: one of ``RETRIEVER_NAMES`` (dense by default)."""

    budget: int
    options: SystemOptions
    retriever: str = "dense"

    @property
    def name(self) -> str:
        options = "" if self.retriever == "dense" else f"[retriever={self.retriever}]"
        return f"rag{options}:{self.budget}"

    def request(self, instance: Instance, engine: Engine) -> Request:
        ctx = self.options.rag_pipeline().context(instance, self.budget, engine.tokenize,
                                                  self.options.corpus, self.retriever)
        extra = {"doc_recall": ctx.doc_recall, "ingest_s": ctx.ingest_s,
                 "retrieval_s": ctx.retrieval_s}
        return Request(build_prompt(instance, docs=ctx.docs), extra=extra)


_RAG_SPEC = re.compile(r"rag(?:\[(?P<options>[^\]]*)\])?:(?P<budget>.*)")


@register_system("rag", f"rag[retriever={'|'.join(RETRIEVER_NAMES)}]:BUDGET")
def _rag(spec: str, options: SystemOptions) -> System:
    usage = ("use rag:BUDGET or rag[retriever=R]:BUDGET with R one of "
             f"{', '.join(RETRIEVER_NAMES)} and BUDGET a number of prompt tokens >= 1 for "
             "the retrieved chunks, e.g. "
             "rag[retriever=hybrid]:1024")
    match = _RAG_SPEC.fullmatch(spec)
    if match is None or not match["budget"].isdigit() or int(match["budget"]) < 1:
        raise SystemSpecError(f"{spec!r}: {usage}")
    try:
        given = dict(parse_options(match["options"], spec)) if match["options"] else {}
    except SpecError as e:
        raise SystemSpecError(str(e)) from None
    retriever = given.pop("retriever", "dense")
    if given or retriever not in RETRIEVER_NAMES:
        raise SystemSpecError(f"{spec!r}: {usage}")
    require("rag", f"the system {spec!r}")
    return RagSystem(int(match["budget"]), options, retriever)


def parse_system(spec: str, options: SystemOptions | None = None) -> System:
    spec = spec.strip()
    prefix = re.split(r"[:@\[]", spec, maxsplit=1)[0]
    if prefix not in SYSTEMS:
        known = ", ".join(SYSTEM_HELP[p] for p in sorted(SYSTEMS))
        raise SystemSpecError(
            f"unknown system {spec!r}; known systems: {known} (RATIO: fraction of document "
            "tokens removed, 0 <= RATIO < 1; TOKENS, BUDGET: token counts >= 1)")
    return SYSTEMS[prefix](spec, options or SystemOptions())


def parse_systems(specs: str, options: SystemOptions | None = None) -> list[System]:
    """Parse a comma-separated list, refusing empty entries and duplicates."""
    names = split_specs(specs)
    if not all(names):
        raise SystemSpecError(f"empty system name in {specs!r}")
    options = options or SystemOptions()
    systems = [parse_system(s, options) for s in names]
    dupes = sorted({s.name for s in systems if [t.name for t in systems].count(s.name) > 1})
    if dupes:
        raise SystemSpecError(f"system(s) listed twice: {', '.join(dupes)}")
    return systems
