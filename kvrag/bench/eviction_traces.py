"""Seeded request traces for the radix-cache eviction benchmark.

Every prompt is a shared header (an instruction template, or a system prompt), a document
of a few thousand tokens, and a short one-off question; the answer decoded after it is
cached too, as SGLang does. The workloads differ in how documents are shared:

- ``stationary``: questions pick one of a few corpora from a Zipf distribution, so
  corpora interleave with a skew, and the cache holds only a few of them;
- ``phases``: the same, with the popularity ranking redrawn twice, which rewards a
  policy that forgets a corpus once it stops being asked about;
- ``bursts``: many questions on one corpus in a row (a team working through a shared
  corpus, as in LOFT), the next corpus drawn by popularity;
- ``system-prompt``: a long shared system prompt, then a document of the user's own
  that no other request sends: nothing but the system prompt can be reused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

Request = tuple[list[int], list[int]]  # (prompt, answer) token ids


@dataclass(frozen=True)
class Workload:
    corpora: int = 6  # distinct shared documents; 0: every request brings its own
    corpus_tokens: tuple[int, int] = (2000, 4000)  # length range, uniform
    questions: int = 300
    question_tokens: tuple[int, int] = (20, 60)
    answer_tokens: int = 16  # decoded, then cached behind the question
    header_tokens: int = 32  # shared by every prompt
    zipf: float = 1.0  # corpus of popularity rank r is asked with weight 1 / r ** zipf
    phases: int = 1  # the popularity ranking is redrawn at the start of each phase
    burst: float = 1.0  # mean questions in a row on one corpus (geometric); 1: none
    cache_corpora: float = 2.5  # cache capacity in mean document lengths

    def capacity(self) -> int:
        return int(self.cache_corpora * sum(self.corpus_tokens) / 2)

    def describe(self) -> str:
        corpora = (f"{self.corpora} corpora" if self.corpora else
                   "a document per request")
        extra = "".join([f", {self.phases} phases" if self.phases > 1 else "",
                         f", bursts of {self.burst:g} on average" if self.burst > 1 else ""])
        return (f"{corpora} of {self.corpus_tokens[0]:,}-{self.corpus_tokens[1]:,} tokens "
                f"behind a {self.header_tokens:,}-token header, {self.questions} questions"
                f"{extra}, cache {self.capacity():,} tokens")


WORKLOADS: dict[str, Workload] = {
    "stationary": Workload(),
    "phases": Workload(phases=3),
    "bursts": Workload(corpora=12, burst=10.0),
    "system-prompt": Workload(corpora=0, header_tokens=1024, corpus_tokens=(200, 3000),
                              cache_corpora=4.0),
}


def make_trace(workload: Workload, seed: int) -> list[Request]:
    """A seeded trace; token ids never repeat except through a shared header or corpus."""
    rng = random.Random(seed)
    next_id = iter(range(1, 1 << 62))

    def fresh(n: int) -> list[int]:
        return [next(next_id) for _ in range(n)]

    header = fresh(workload.header_tokens)
    trace: list[Request] = []
    if not workload.corpora:
        for _ in range(workload.questions):
            document = fresh(rng.randint(*workload.corpus_tokens))
            question = fresh(rng.randint(*workload.question_tokens))
            trace.append((header + document + question, fresh(workload.answer_tokens)))
        return trace
    corpora = [fresh(rng.randint(*workload.corpus_tokens)) for _ in range(workload.corpora)]
    weights = [1 / (rank + 1) ** workload.zipf for rank in range(workload.corpora)]
    for phase in range(workload.phases):
        ranking = rng.sample(corpora, len(corpora))  # ranking[0] is the most asked
        corpus = None
        while len(trace) < workload.questions * (phase + 1) // workload.phases:
            if corpus is None or rng.random() < 1 / workload.burst:
                corpus = rng.choices(ranking, weights)[0]
            question = fresh(rng.randint(*workload.question_tokens))
            trace.append((header + corpus + question, fresh(workload.answer_tokens)))
    return trace
