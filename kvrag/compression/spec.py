"""Compression spec strings: ``METHOD:RATIO`` or ``METHOD@TOKENS``, optionally ``once:``
and options in brackets: ``METHOD[key=value;key=value]:RATIO``.

RATIO is the fraction of evictable (document) tokens removed, 0 <= RATIO < 1, the kvpress
convention; TOKENS is an absolute number of document tokens kept.

Options are the method's own settings (``snapkv[window=32;kernel=7]:0.5``) and two that
every scoring method takes, which decide how scores become a kept set (select.py):

- ``chunk=C`` keeps whole chunks of C document tokens, the best-scoring first, instead of
  single tokens (ChunkKV, arXiv 2502.00299); ``chunk=sentence`` makes each sentence a chunk;
- ``heads=shared`` keeps one set per layer for all its KV heads (their scores averaged)
  instead of one per head (``heads=per-head``, the default, the same count for each);
  ``heads=ranked`` ranks the tokens of all a layer's KV heads together, so the layer keeps
  the same total but a head may keep more than another (AdaKV's and KVzip's shape).

``once:METHOD:RATIO`` compresses the corpus prefix (system turn, header, documents) once,
before any question is seen, and answers every question over that corpus from the same
compressed cache. Its scoring is question-agnostic: the methods that score with the
prompt's last queries (SnapKV's observation window, TOVA's last token) see the corpus
tail instead of the question, kvpress's convention. Without ``once:`` the whole prompt,
question included, is prefilled before the documents are compressed (question-aware).

``once:METHOD:RATIO+recall@TOKENS`` (or ``+recall:SHARE``, a share of the document tokens)
keeps the evicted entries of the compressed corpus in host memory, and lets each question
bring back up to TOKENS of them per layer, chosen by its own queries (``recall.py``).
The corpus must keep one set for all heads (``heads=shared``). Its options:
``chunk=C`` recalls whole chunks of C document tokens (default 8); ``reprefill=0``
answers from the question's first prefill instead of prefilling it again over what it
recalled (the default, ``reprefill=1``); ``window=W`` scores with the question's last W
queries (default 64); ``after=A`` ranks the A chunks that follow each chosen chunk right
after it, so a key the question finds brings the text that follows it (default 2).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, replace

from kvrag.compression.base import METHODS, Method


class SpecError(ValueError):
    """A spec that names no method or an impossible ratio/budget; says what is allowed."""


ONCE = "once:"
RECALL = "+recall"
RECALL_CHUNK = 8  # fine spans waste less of the budget than 16 (needles, two suites)
#: the options ``+recall`` takes, and what each allows
RECALL_OPTIONS = {"chunk": "a whole number of tokens >= 1", "reprefill": "0 or 1",
                  "window": "1 to 64 of the question's last queries",
                  "after": "0 to 4 chunks recalled after each chosen one"}
RECALL_AFTER = 2  # a found chunk brings the 16 tokens after it: an answer follows its key
RECALL_AFTER_MAX = 4
RECALL_WINDOW = 64  # SnapKV's observation window, and what the plugin keeps by default
SENTENCE = "sentence"
HEADS = ("per-head", "shared", "ranked")
#: Options every method takes, and what each allows.
SELECTION_OPTIONS = {
    "chunk": f"a whole number of tokens >= 1, or {SENTENCE!r}",
    "heads": " or ".join(repr(h) for h in HEADS),
}
_SPEC = re.compile(r"(?P<method>[^\[:@]*)(?:\[(?P<options>[^\]]*)\])?(?P<rest>.*)")


def _usage() -> str:
    return (f"use METHOD:RATIO with 0 <= RATIO < 1 (fraction of document tokens removed) or "
            f"METHOD@TOKENS with TOKENS >= 1 (document tokens kept), either optionally "
            f"with options METHOD[key=value;...] and prefixed with {ONCE} (compress the "
            f"corpus once for all its questions); methods: {', '.join(sorted(METHODS))}")


def method_options(method: str) -> dict[str, type]:
    """The settings ``method`` takes in a spec, with their types."""
    cls = METHODS[method]
    if not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _allowed(method: str) -> str:
    cls = METHODS[method]
    own = [f"{name} ({kind.__name__}, default {getattr(cls, name)!r})"
           for name, kind in method_options(method).items()]
    common = [f"{name} ({allowed})" for name, allowed in SELECTION_OPTIONS.items()]
    return f"{method} takes: {', '.join(own + common)}"


def _canonical(method: str, key: str, value: str) -> str:
    """``value`` of option ``key`` as the name writes it; SpecError if it is not allowed."""
    kinds = method_options(method)
    if key == "chunk":
        if value.lower() == SENTENCE:
            return SENTENCE
        if value.isdigit() and int(value) >= 1:
            return str(int(value))
    elif key == "heads":
        if value.lower() in HEADS:
            return value.lower()
    elif key in kinds:
        kind = kinds[key]
        try:
            if kind is str:  # the method checks its own words when it is built
                return value
            return str(int(value)) if kind is int else repr(kind(value))
        except ValueError:
            pass
    else:
        raise SpecError(f"unknown option {key!r} for {method}; {_allowed(method)}")
    raise SpecError(f"{key}={value!r} is not allowed for {method}; {_allowed(method)}")


@dataclass(frozen=True)
class CompressionSpec:
    method: str
    ratio: float | None = None
    budget: int | None = None
    once: bool = False  # compress the corpus prefix once, before any question
    options: tuple[tuple[str, str], ...] = ()  # (key, value) pairs, sorted by key
    recall: Recall | None = None  # once: only: per-question recall from the host store

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"unknown compression method {self.method!r}; {_usage()}")
        if (self.ratio is None) == (self.budget is None):
            raise SpecError(f"give exactly one of a ratio or a budget; {_usage()}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise SpecError(f"ratio {self.ratio} is out of range; {_usage()}")
        if self.budget is not None and self.budget < 1:
            raise SpecError(f"budget {self.budget} is out of range; {_usage()}")
        keys = [key for key, _ in self.options]
        if len(set(keys)) != len(keys):
            raise SpecError(f"an option is given twice in {keys}; {_allowed(self.method)}")
        canonical = tuple(sorted((k, _canonical(self.method, k, v)) for k, v in self.options))
        object.__setattr__(self, "options", canonical)
        method = self.build()
        if self.once and method.dynamic:
            raise SpecError(f"{self.method} keeps the whole cache and picks keys per decoded "
                            f"token, so there is nothing to compress once; drop {ONCE!r}")
        if method.dynamic and self.selection_options:
            raise SpecError(f"{self.method} picks keys per decoded token, not one kept set "
                            f"after prefill, so it takes no {' or '.join(SELECTION_OPTIONS)}")
        if self.recall is not None:
            self._check_recall(method)

    def _check_recall(self, method: Method) -> None:
        base = replace(self, recall=None).name
        if not self.once:
            raise SpecError(f"{RECALL} recalls what a corpus compressed once evicted; write "
                            f"{ONCE}{base}{RECALL}...")
        if not self.shared_heads:
            raise SpecError(f"{base}{RECALL}: a recalled token is brought back for every KV "
                            "head, so the corpus must keep one set for all heads; add "
                            "heads=shared to its options")
        if not method.uniform_layers:
            raise SpecError(f"{base}{RECALL}: {self.method} keeps different counts per "
                            "layer; recall needs one count for every layer")

    @property
    def name(self) -> str:
        method = self.method
        if self.options:
            method += "[" + ";".join(f"{k}={v}" for k, v in self.options) + "]"
        # repr: the shortest text that reads back as the same float, so no two ratios collide
        base = f"{method}:{self.ratio!r}" if self.ratio is not None else f"{method}@{self.budget}"
        if self.recall is not None:
            base += self.recall.name
        return ONCE + base if self.once else base

    @property
    def selection_options(self) -> dict[str, str]:
        return {k: v for k, v in self.options if k in SELECTION_OPTIONS}

    @property
    def chunk(self) -> int | str | None:
        """Tokens per kept chunk, ``"sentence"``, or None (token by token)."""
        value = self.selection_options.get("chunk")
        return value if value in (None, SENTENCE) else int(value)

    @property
    def shared_heads(self) -> bool:
        return self.selection_options.get("heads") == "shared"

    @property
    def ranked_heads(self) -> bool:
        """Each layer's budget spread over its KV heads by score rank."""
        return self.selection_options.get("heads") == "ranked"

    def build(self) -> Method:
        """The method with this spec's settings; built once per spec (methods are
        stateless), however often engines ask."""
        return _build(self)

    @property
    def pools_heads(self) -> bool:
        """Whether scoring reads every query head of a layer (across tensor-parallel ranks)."""
        return self.build().pools_heads or self.shared_heads

    def kept(self, n_evictable: int) -> int:
        """How many of ``n_evictable`` document tokens this spec keeps."""
        if self.budget is not None:
            return min(self.budget, n_evictable)
        assert self.ratio is not None
        return n_evictable - int(round(n_evictable * self.ratio))

    def keeps_all(self, n_evictable: int) -> bool:
        """A budget at or above the documents' length: there is nothing to evict, and every
        engine answers from the full cache (a ratio, even 0, always runs the method)."""
        return self.ratio is None and self.kept(n_evictable) >= n_evictable


@dataclass(frozen=True)
class Recall:
    """``+recall``: how much of what a compressed corpus evicted each question may bring
    back (``tokens`` per layer, or a ``share`` of the document tokens), in whole chunks."""

    tokens: int | None = None
    share: float | None = None
    chunk: int = RECALL_CHUNK
    reprefill: bool = True  # prefill the question again over what it recalled
    window: int = RECALL_WINDOW  # the question's last queries that score
    after: int = RECALL_AFTER  # chunks that follow each chosen chunk, ranked right after it

    def __post_init__(self) -> None:
        usage = (f"write {RECALL}@TOKENS (TOKENS >= 1) or {RECALL}:SHARE (0 < SHARE <= 1 of "
                 f"the document tokens), with options {RECALL}[key=value;...]: "
                 + ", ".join(f"{k} ({v})" for k, v in RECALL_OPTIONS.items()))
        if (self.tokens is None) == (self.share is None):
            raise SpecError(f"give exactly one recall budget; {usage}")
        if self.tokens is not None and self.tokens < 1 or self.share is not None and not (
                0 < self.share <= 1) or self.chunk < 1 or not 1 <= self.window <= RECALL_WINDOW \
                or not 0 <= self.after <= RECALL_AFTER_MAX:
            raise SpecError(f"recall budget or chunk out of range; {usage}")

    @classmethod
    def parse(cls, text: str, spec: str) -> Recall:
        """``text``: what follows ``+recall`` in ``spec``."""
        match = _SPEC.fullmatch(text)
        assert match is not None
        settings: dict = {}
        if match["method"].strip():
            raise SpecError(f"cannot read {text!r} after {RECALL} in {spec!r}")
        for key, value in parse_options(match["options"], spec) if match["options"] else ():
            if key not in RECALL_OPTIONS:
                raise SpecError(f"unknown {RECALL} option {key!r}; it takes "
                                + ", ".join(f"{k} ({v})" for k, v in RECALL_OPTIONS.items()))
            if key == "chunk" and value.isdigit() and int(value) >= 1:
                settings["chunk"] = int(value)
            elif key == "reprefill" and value in ("0", "1"):
                settings["reprefill"] = value == "1"
            elif key == "window" and value.isdigit() and 1 <= int(value) <= RECALL_WINDOW:
                settings["window"] = int(value)
            elif key == "after" and value.isdigit() and int(value) <= RECALL_AFTER_MAX:
                settings["after"] = int(value)
            else:
                raise SpecError(f"{RECALL} option {key}={value!r} is not allowed; {key} is "
                                f"{RECALL_OPTIONS[key]}")
        rest = match["rest"].strip()
        try:
            if rest.startswith(":"):
                return cls(share=float(rest[1:]), **settings)
            if rest.startswith("@"):
                return cls(tokens=int(rest[1:]), **settings)
        except ValueError as err:
            if isinstance(err, SpecError):
                raise
        return cls(**settings)  # no budget: SpecError with the usage

    @property
    def name(self) -> str:
        options = [f"chunk={self.chunk}"] if self.chunk != RECALL_CHUNK else []
        options += [] if self.reprefill else ["reprefill=0"]
        options += [] if self.window == RECALL_WINDOW else [f"window={self.window}"]
        options += [] if self.after == RECALL_AFTER else [f"after={self.after}"]
        head = RECALL + (f"[{';'.join(options)}]" if options else "")
        return head + (f"@{self.tokens}" if self.tokens is not None else f":{self.share!r}")

    def budget(self, n_doc: int, n_evicted: int) -> int:
        """Tokens a question recalls per layer: its budget, at most what was evicted."""
        want = self.tokens if self.tokens is not None else int(round(n_doc * self.share))
        return min(want, n_evicted)


@functools.cache
def _build(spec: CompressionSpec) -> Method:
    kinds = method_options(spec.method)
    settings = {k: kinds[k](v) for k, v in spec.options if k in kinds}
    try:
        return METHODS[spec.method](**settings)
    except ValueError as err:
        raise SpecError(f"{spec.name}: {err}; {_allowed(spec.method)}") from None


def queries_needed(specs: Iterable[CompressionSpec]) -> int | None:
    """The most prompt queries any of ``specs`` scores with (None: all of them)."""
    needed = [spec.build().queries_needed() for spec in specs]
    return None if None in needed else max(needed, default=0)


def parse_options(text: str, spec: str) -> tuple[tuple[str, str], ...]:
    """``key=value;key=value`` (inside a spec's brackets) as pairs, in order."""
    options = []
    for item in text.split(";"):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not key or not eq or not value:
            raise SpecError(f"cannot read option {item.strip()!r} in {spec!r}; write "
                            "METHOD[key=value;key=value]")
        options.append((key, value))
    return tuple(options)


def parse_spec(text: str) -> CompressionSpec:
    text = text.strip()
    if text.startswith(ONCE):
        base, plus, recall = text[len(ONCE):].partition(RECALL)
        spec = replace(parse_spec(base), once=True)
        return replace(spec, recall=Recall.parse(recall, text)) if plus else spec
    if RECALL in text:
        base = text.partition(RECALL)[0]
        raise SpecError(f"{RECALL} recalls what a corpus compressed once evicted; write "
                        f"{ONCE}{base}{RECALL}...")
    match = _SPEC.fullmatch(text)
    assert match is not None  # every part of the pattern may be empty
    method, rest = match["method"].strip(), match["rest"].strip()
    options = parse_options(match["options"], text) if match["options"] is not None else ()
    if rest.startswith("["):
        raise SpecError(f"unclosed '[' in {text!r}; {_usage()}")
    if not rest:
        raise SpecError(f"{text!r} has no ratio or budget; {_usage()}")
    sep, value = rest[0], rest[1:]
    try:
        if sep == ":":
            return CompressionSpec(method, ratio=float(value), options=options)
        if sep == "@":
            return CompressionSpec(method, budget=int(value), options=options)
    except ValueError as err:
        if isinstance(err, SpecError):
            raise
        raise SpecError(f"cannot read {value!r} in {text!r}; {_usage()}") from None
    raise SpecError(f"cannot read {rest!r} in {text!r}; {_usage()}")


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, split on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return items
