"""Corpora at the size users bring, generated from the bundled demo's documents (or the
user's): an endless stream of distinct variants for benchmarks, and a LOFT-layout set.

A variant rotates a source document's sentences and numbers its title and id, so no two
passages (and no two chunk ids) are the same while the text stays ordinary prose.
``make_loft`` writes ``corpus.jsonl`` and ``dev_queries.jsonl`` in LOFT's RAG layout: each
query asks for a special magic number hidden in one passage (its qrel), the rest of the
corpus being distractors, so retrieval has one right answer to find.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvrag.data.needles import insert_sentence, key_name, value_of
from kvrag.data.schema import Doc

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
MAX_QUERIES = 500  # of the 576 two-word keys needles.key_name makes


def varied_docs(source: Sequence[Doc]) -> Iterator[Doc]:
    """An endless stream of distinct docs: round r rotates each source doc's sentences by
    r and numbers its title and id."""
    for r in itertools.count():
        for doc in source:
            sentences = _SENTENCE.split(doc.text.strip())
            k = r % len(sentences)
            yield Doc(f"{doc.id}~{r}", f"{doc.title} #{r}",
                      " ".join(sentences[k:] + sentences[:k]))


def make_loft(out: Path, source: Sequence[Doc], passages: int, queries: int,
              seed: int = 0) -> None:
    """Write a LOFT RAG set of ``passages`` passages and ``queries`` questions to ``out``."""
    if not 1 <= queries <= min(passages, MAX_QUERIES):
        raise ValueError(f"need 1 <= queries <= passages and queries <= {MAX_QUERIES} (one "
                         f"distinct key each), got {queries} queries over {passages} passages")
    rng = random.Random(seed)
    gold = sorted(rng.sample(range(passages), queries))
    keys: list[str] = []
    while len(keys) < queries:
        key = key_name(rng)
        if key not in keys:
            keys.append(key)
    needles = {at: (key, value_of("number", rng)) for at, key in zip(gold, keys, strict=True)}
    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as corpus:
        for i, doc in enumerate(itertools.islice(varied_docs(source), passages)):
            if i in needles:
                key, value = needles[i]
                doc = insert_sentence(doc, f"The special magic number for {key} is {value}.",
                                      rng)
            corpus.write(json.dumps({"pid": f"p{i}", "title_text": doc.title,
                                     "passage_text": doc.text, "metadata": {}}) + "\n")
    with (out / "dev_queries.jsonl").open("w") as dev:
        for n, (at, (key, value)) in enumerate(needles.items()):
            dev.write(json.dumps({
                "qid": f"q{n}", "query_text": f"What is the special magic number for {key}?",
                "answers": [value], "metadata": {"qrels": [[f"p{at}", 1]]}}) + "\n")
