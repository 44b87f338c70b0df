"""The corpus-in-context prompt that every system (full, compressed, RAG) shares.

Layout of the user turn: a one-line header, the documents as ``[DOC i] title\\ntext``
blocks, then the question and the answer instructions. Compression may only evict
tokens inside ``context``; the header and the query are always kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from kvrag.data.schema import LETTERS, Doc, Instance

ANSWER_MARKER = "The answer is:"
# Wording picked on SmolLM2-135M: quoting the marker ('Reply ... in the form "The answer
# is: <answer>"') made it repeat the marker endlessly; a system turn kept it brief.
SYSTEM = "You answer questions using only the given documents. Reply briefly."
HEADER = "Read the documents and answer the question after them.\n\n"


@dataclass(frozen=True)
class Prompt:
    """One prompt as three consecutive strings, plus which doc each ``[DOC i]`` tag is."""

    header: str
    context: str
    query: str
    doc_tags: dict[int, str]  # DOC number shown in the prompt -> doc id

    @property
    def text(self) -> str:
        return self.header + self.context + self.query

    @property
    def context_span(self) -> tuple[int, int]:
        """Character span of the documents inside ``text``."""
        return len(self.header), len(self.header) + len(self.context)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.text}]


def format_doc(number: int, doc: Doc) -> str:
    return f"[DOC {number}] {doc.title}\n{doc.text}\n\n"


def instructions(instance: Instance) -> str:
    if instance.task == "mc":
        return f"Choose one option. Finish your reply with: {ANSWER_MARKER} <letter>"
    if instance.task == "sum":
        return "Reply with the summary only."
    return f"Finish your reply with: {ANSWER_MARKER} <answer>"


def build_prompt(
    instance: Instance, docs: Sequence[tuple[int, Doc]] | None = None
) -> Prompt:
    """Build the prompt for ``instance``.

    ``docs`` is an optional subset as (DOC number, doc) pairs, e.g. the chunks RAG
    retrieved; numbers then stay those of the full corpus so cited ids stay comparable.
    By default every doc is shown, numbered from 1 in instance order.
    """
    if docs is None:
        docs = list(enumerate(instance.docs, start=1))
    context = "".join(format_doc(n, d) for n, d in docs)
    query = f"Question: {instance.question}\n"
    if instance.task == "mc":
        query += "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(instance.choices))
    query += instructions(instance)
    return Prompt(header=HEADER, context=context, query=query,
                  doc_tags={n: d.id for n, d in docs})


def prompt_version() -> str:
    """A short hash of the prompt template (system turn, header, document and question
    layout, instructions), so results made with another template are never mixed."""
    docs = [Doc("a", "Title A", "Text a."), Doc("b", "Title B", "Text b.")]
    probes = [Instance("v", "Question?", ["x"], docs, ["a"]),
              Instance("v", "Question?", ["A"], docs, ["a"], task="mc", choices=["x", "y"]),
              Instance("v", "Summarize.", ["x"], docs, [], task="sum")]
    text = "\x00".join(json.dumps(build_prompt(p).messages()) for p in probes)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
