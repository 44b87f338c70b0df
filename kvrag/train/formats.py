"""Training targets, one small function per output format (as in arXiv 2601.18527).

Every target ends with the line ``The answer is: X`` that the evaluation's
``extract_answer`` reads, and cites documents with the ``[DOC i]`` tags that
``cited_doc_ids`` reads, so a model trained on these targets is scored on exactly what it
learned to write. The formats that cite need ``gold_doc_ids``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from kvrag.data.prompt import ANSWER_MARKER, format_doc
from kvrag.data.schema import LETTERS, Doc, Instance
from kvrag.evaluation.metrics import normalize, substring_exact_match

CountTokens = Callable[[str], int]
PlacedDocs = Sequence[tuple[int, Doc]]  # (DOC number shown in the prompt, doc)
TargetFn = Callable[[Instance, PlacedDocs, CountTokens], str]

MAX_QUOTE_TOKENS = 30  # the study's cap on one quoted span
CITE_HEADER = "Relevant documents:"
QUOTES_HEADER = "Quotes:"
COPY_HEADER = "Copied documents:"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


class FormatError(ValueError):
    """An instance that cannot be turned into a target of the requested format."""


def count_words(text: str) -> int:
    """Whitespace token count: the stand-in for a tokenizer in tests and quick runs."""
    return len(text.split())


def build_target(
    fmt: str, instance: Instance, docs: PlacedDocs, count_tokens: CountTokens = count_words
) -> str:
    """The target text of ``instance`` in format ``fmt`` for docs placed as ``docs``."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown target format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt](instance, docs, count_tokens)


def require_gold(instance: Instance, needed_by: str) -> None:
    """Raise FormatError unless ``instance`` names gold documents.

    ``needed_by`` names what cites them, e.g. "format 'ids'" or "reward 'id'".
    """
    if not instance.gold_doc_ids:
        raise FormatError(
            f"instance {instance.id!r} has no gold_doc_ids, but {needed_by} cites gold "
            "documents; use format 'answer' (reward 'ao'), or a dataset that marks gold "
            "documents (kvrag 'gold_doc_ids', or a gold flag on HELMET ctxs)"
        )


def gold_docs(instance: Instance, docs: PlacedDocs, fmt: str) -> list[tuple[int, Doc]]:
    """The placed gold docs in prompt order; every gold doc must be placed."""
    require_gold(instance, f"format {fmt!r}")
    placed = {doc.id: n for n, doc in docs}
    missing = [g for g in instance.gold_doc_ids if g not in placed]
    if missing:
        raise FormatError(
            f"instance {instance.id!r}: gold docs {missing} are not in the prompt, so "
            f"format {fmt!r} cannot cite them"
        )
    gold = set(instance.gold_doc_ids)
    return sorted((n, doc) for n, doc in docs if doc.id in gold)


def answer_line(instance: Instance) -> str:
    """The last line of every target; for multiple choice the letter, as evaluation reads it."""
    return f"{ANSWER_MARKER} {instance.answers[0].strip()}"


def cite_line(gold: list[tuple[int, Doc]]) -> str:
    return f"{CITE_HEADER} " + ", ".join(f"[DOC {n}]" for n, _ in gold)


def evidence_strings(instance: Instance) -> list[str]:
    """What a supporting sentence contains: the answers, or the correct choices' text."""
    if instance.task == "mc":
        return [instance.choices[LETTERS.index(a)] for a in instance.answers]
    return instance.answers


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences and lines of ``text``, surrounding space trimmed."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    trimmed = []
    for a, b in spans:
        piece = text[a:b]
        if piece.strip():
            a += len(piece) - len(piece.lstrip())
            trimmed.append((a, a + len(piece.strip())))
    return trimmed


def _best_sentence(text: str, evidence: list[str], hint: str) -> tuple[int, int]:
    """The first sentence holding an evidence string, else the one sharing most hint words."""
    spans = sentence_spans(text)
    if not spans:
        return 0, 0
    for a, b in spans:
        if substring_exact_match(text[a:b], evidence):
            return a, b
    words = set(normalize(hint).split())
    return max(spans, key=lambda s: len(words & set(normalize(text[s[0]:s[1]]).split())))


def quote_span(
    text: str, evidence: list[str], hint: str, count_tokens: CountTokens,
    max_tokens: int = MAX_QUOTE_TOKENS,
) -> str:
    """A verbatim single-line span of ``text`` of at most ``max_tokens`` tokens.

    The first sentence holding an evidence string, else the first one sharing most words
    with ``hint`` (the question and the other gold titles: the bridge of a two-hop
    question), if it fits; otherwise the words around the evidence string, widened one word
    right then one word left while they fit. Empty when not even one word fits.
    """
    a, b = _best_sentence(text, evidence, hint)
    if count_tokens(text[a:b]) <= max_tokens:
        return text[a:b]
    words = [(a + m.start(), a + m.end()) for m in re.finditer(r"\S+", text[a:b])]
    lo = hi = 0
    lowered = text[a:b].lower()
    for ev in evidence:
        at = lowered.find(ev.lower()) if ev.strip() else -1
        if at >= 0:
            inside = [i for i, (s, e) in enumerate(words) if s < a + at + len(ev) and e > a + at]
            lo, hi = inside[0], inside[-1]
            break

    def fits(i: int, j: int) -> bool:
        return count_tokens(text[words[i][0]:words[j][1]]) <= max_tokens

    while hi > lo and not fits(lo, hi):
        hi -= 1
    if not fits(lo, hi):
        return ""
    grown = True
    while grown:
        grown = False
        if hi + 1 < len(words) and fits(lo, hi + 1):
            hi, grown = hi + 1, True
        if lo > 0 and fits(lo - 1, hi):
            lo, grown = lo - 1, True
    return text[words[lo][0]:words[hi][1]]


def answer_target(instance: Instance, docs: PlacedDocs, count_tokens: CountTokens) -> str:
    """R_AO / SFT baseline: the answer line only."""
    return answer_line(instance)


def ids_target(instance: Instance, docs: PlacedDocs, count_tokens: CountTokens) -> str:
    """R_ID: cite the gold ``[DOC i]`` tags, then answer."""
    gold = gold_docs(instance, docs, "ids")
    return f"{cite_line(gold)}\n{answer_line(instance)}"


def ids_quotes_target(instance: Instance, docs: PlacedDocs, count_tokens: CountTokens) -> str:
    """R_ID+Q: cite, then one ``[DOC i] "span"`` line per gold doc (≤ 30 tokens), then answer."""
    gold = gold_docs(instance, docs, "ids+quotes")
    evidence = evidence_strings(instance)
    lines = [cite_line(gold), QUOTES_HEADER]
    for n, doc in gold:
        titles = " ".join(other.title for m, other in gold if m != n)
        quote = quote_span(doc.text, evidence, f"{instance.question} {titles}", count_tokens)
        if quote:
            lines.append(f'[DOC {n}] "{quote}"')
    return "\n".join([*lines, answer_line(instance)])


def ids_copy_target(instance: Instance, docs: PlacedDocs, count_tokens: CountTokens) -> str:
    """R_ID+C: cite, then copy each gold doc exactly as the prompt shows it, then answer."""
    gold = gold_docs(instance, docs, "ids+copy")
    copies = "".join(format_doc(n, doc) for n, doc in gold)
    return f"{cite_line(gold)}\n{COPY_HEADER}\n{copies}{answer_line(instance)}"


FORMATS: dict[str, TargetFn] = {
    "answer": answer_target, "ids": ids_target, "ids+quotes": ids_quotes_target,
    "ids+copy": ids_copy_target,
}
