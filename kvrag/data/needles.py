"""A needle-in-a-haystack suite in the style of RULER (Hsieh et al., 2024, arXiv 2404.06654).

Each corpus is a haystack of ordinary passages (the bundled demo's, or the user's own text
files) about ``context_tokens`` long, cut into documents, with needles of the form "The
special magic number for KEY is VALUE." placed at evenly spread depths. Task families:

- ``single``: one needle per corpus, one question;
- ``multikey``: ``needles`` needles with different keys; one question per key, all over
  the same corpus (the other keys' needles are the distractors);
- ``multivalue``: ``needles`` values for one key; one question asking for all of them, in
  the order they appear, and scored as one answer ("v1, v2, ..."), so a missing or
  reordered value fails it.

Values are 7-digit numbers, words or invented names. An answer is a copy of the needle's
value, so a cache that keeps most but not all of a needle's tokens fails the question:
what span-consistent selection (``chunk=C``, ``heads=shared``) is for.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvrag.data.demo import DEMO_PATH, estimate_tokens
from kvrag.data.schema import DatasetError, Doc, Instance, parse_instance, read_records

TASKS = ("single", "multikey", "multivalue")
KINDS = ("number", "word", "name")
TEXT_SUFFIXES = (".txt", ".md")

_KEY_A = ["quiet", "amber", "hollow", "brisk", "silver", "crooked", "gentle", "northern",
          "velvet", "rusty", "hidden", "bitter", "frozen", "golden", "lonely", "narrow",
          "pale", "restless", "sunken", "tidal", "wild", "woven", "scarlet", "distant"]
_KEY_B = ["harbor", "lantern", "orchard", "falcon", "meadow", "compass", "glacier", "violin",
          "quarry", "beacon", "thicket", "anchor", "cavern", "sparrow", "ledger", "tundra",
          "pebble", "chimney", "mirror", "canyon", "willow", "saddle", "furnace", "island"]
_WORDS = ["apricot", "blizzard", "cathedral", "dolphin", "eclipse", "fountain", "gazelle",
          "horizon", "iceberg", "jasmine", "kangaroo", "labyrinth", "marble", "nectar",
          "obsidian", "pendulum", "quartz", "raspberry", "sapphire", "trumpet", "umbrella",
          "volcano", "walnut", "zeppelin", "biscuit", "cobbler", "dragonfly", "emerald"]
_NAME_ONSETS = ["Bal", "Cor", "Dam", "Eld", "Fal", "Gil", "Hor", "Ith", "Jas", "Kor", "Lud",
                "Mav", "Nel", "Osk", "Per", "Ral", "Sav", "Tam", "Ulf", "Var", "Wes", "Yor"]
_NAME_ENDS = ["ric", "wen", "mar", "dane", "lis", "tor", "bert", "ella", "ion", "sa", "ric",
              "nor", "ith", "una", "ald", "ene"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class NeedleConfig:
    """What a needle suite is made of; the same config and text give the same suite."""

    context_tokens: int = 3000  # haystack tokens per corpus (estimated, model-free)
    corpora: int = 5  # per task family and value kind
    needles: int = 4  # per corpus (multikey: keys; multivalue: values of one key)
    tasks: tuple[str, ...] = ("multikey",)
    kinds: tuple[str, ...] = ("number",)
    doc_tokens: int = 200  # document size when the haystack is a text folder
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS] + [k for k in self.kinds
                                                            if k not in KINDS]
        if bad or not self.tasks or not self.kinds:
            raise ValueError(f"unknown or missing task/kind {bad}; tasks: {', '.join(TASKS)}; "
                             f"kinds: {', '.join(KINDS)}")
        if self.corpora < 1 or self.needles < 1:
            raise ValueError("--corpora and --needles must be at least 1")
        if self.context_tokens < 100 or self.doc_tokens < 20:
            raise ValueError("--context-tokens must be at least 100 and --doc-tokens at "
                             "least 20")


# The bundled suite of the README's first run (``--dataset needles``): short haystacks the
# packaged model can answer from (``full`` about two answers in three), 24 questions.
FIRST_RUN = NeedleConfig(context_tokens=1500, corpora=6, needles=4, seed=0)
NEEDLES_PATH = DEMO_PATH.parent / "needles.jsonl"


def demo_passages() -> list[tuple[str, str]]:
    """The bundled demo's documents as (title, text) haystack passages, each once."""
    seen: dict[str, str] = {}
    for instance in read_records(DEMO_PATH, lambda record, _: parse_instance(record)):
        for doc in instance.docs:
            seen.setdefault(doc.text, doc.title)
    return [(title, text) for text, title in seen.items()]


def folder_passages(folder: Path, doc_tokens: int) -> list[tuple[str, str]]:
    """The ``.txt``/``.md`` files under ``folder`` cut at paragraph breaks into passages
    of about ``doc_tokens`` tokens, titled by file."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
    if not folder.is_dir() or not files:
        raise DatasetError(f"{folder}: no {' or '.join(TEXT_SUFFIXES)} files to make a "
                           "haystack from")
    passages = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DatasetError(f"{path}: not UTF-8 text ({err.reason})") from None
        part: list[str] = []
        for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
            if paragraph:
                part.append(" ".join(paragraph.split()))
            if part and (not paragraph or estimate_tokens(" ".join(part)) >= doc_tokens):
                passages.append((f"{path.stem} ({len(passages) + 1})", " ".join(part)))
                part = []
        if part:
            passages.append((f"{path.stem} ({len(passages) + 1})", " ".join(part)))
    return passages


def value_of(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "word":
        return rng.choice(_WORDS)
    return rng.choice(_NAME_ONSETS) + rng.choice(_NAME_ENDS)


def key_name(rng: random.Random) -> str:
    return f"{rng.choice(_KEY_A)}-{rng.choice(_KEY_B)}"


def _distinct(make, count: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = make(rng)
        if value not in out:
            out.append(value)
    return out


def _haystack(passages: list[tuple[str, str]], start: int, tokens: int) -> list[Doc]:
    docs, total, i = [], 0.0, start
    while total < tokens:
        title, text = passages[i % len(passages)]
        docs.append(Doc(id=f"p{len(docs)}", title=title, text=text))
        total += estimate_tokens(f"{title}\n{text}")
        i += 1
        if i - start > len(passages):
            break
    return docs


def insert_sentence(doc: Doc, sentence: str, rng: random.Random) -> Doc:
    """``doc`` with ``sentence`` placed at a random sentence boundary."""
    parts = _SENTENCE_END.split(doc.text)
    at = rng.randrange(len(parts) + 1)
    return Doc(doc.id, doc.title, " ".join(parts[:at] + [sentence] + parts[at:]))


def _corpus(task: str, kind: str, c: int, passages: list[tuple[str, str]],
            cfg: NeedleConfig, rng: random.Random) -> list[Instance]:
    count = 1 if task == "single" else cfg.needles
    docs = _haystack(passages, rng.randrange(len(passages)), cfg.context_tokens)
    if len(docs) < count:
        raise ValueError(f"a {cfg.context_tokens}-token haystack holds {len(docs)} documents, "
                         f"too few for {count} needles; raise --context-tokens")
    keys = _distinct(key_name,
                     1 if task == "multivalue" else count, rng)
    values = _distinct(lambda r: value_of(kind, r), count, rng)
    # needle i at depth (i + 0.5) / count of the haystack
    at = [int((i + 0.5) * len(docs) / count) for i in range(count)]
    for i, value in enumerate(values):
        key = keys[0 if task == "multivalue" else i]
        sentence = (f"One of the special magic {kind}s for {key} is {value}."
                    if task == "multivalue" else f"The special magic {kind} for {key} is {value}.")
        docs[at[i]] = insert_sentence(docs[at[i]], sentence, rng)
    provenance = {"generator": "kvrag data make-needles", "seed": cfg.seed,
                  "context_tokens": cfg.context_tokens, "depths": [a / len(docs) for a in at]}
    base = f"needle-{task}-{kind}-{c:03d}"
    subset = f"{task}_{kind}"
    if task == "multivalue":
        question = (f"What are all the special magic {kind}s for {keys[0]} mentioned in the "
                    "documents? Give them in the order they appear, separated by commas.")
        return [Instance(f"{base}-0", question, [", ".join(values)], docs,
                         sorted({docs[a].id for a in at}), subset=subset,
                         provenance=provenance)]
    return [Instance(f"{base}-{i}", f"What is the special magic {kind} for {key} mentioned in "
                     "the documents?", [value], docs, [docs[at[i]].id], subset=subset,
                     provenance=provenance)
            for i, (key, value) in enumerate(zip(keys, values, strict=True))]


def make_needles(cfg: NeedleConfig, passages: list[tuple[str, str]] | None = None
                 ) -> Iterator[Instance]:
    """The suite: for each task family and value kind, ``cfg.corpora`` corpora."""
    passages = demo_passages() if passages is None else passages
    if not passages:
        raise ValueError("the haystack text is empty")
    rng = random.Random(cfg.seed)
    passages = sorted(passages)
    rng.shuffle(passages)
    for task in cfg.tasks:
        for kind in cfg.kinds:
            for c in range(cfg.corpora):
                yield from _corpus(task, kind, c, passages, cfg, rng)
