"""``kvrag data build``: corpus-in-context instances from one's own QA pairs and corpus.

The recipe of the in-context retrieval study: the corpus is split into passages and
ingested once into Chroma; for each question the top ``negatives`` passages a dense
retriever returns become hard negatives, a negative that contains a gold answer is
promoted to gold (optionally only when an LLM judge agrees), gold and negatives are
shuffled, and the lowest-ranked negatives are dropped until the prompt fits
``max_tokens``. Every instance records its provenance.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvrag.data.public_formats import split_context
from kvrag.data.schema import DatasetError, Doc, Instance, read_records
from kvrag.evaluation.judge import ChatClient
from kvrag.evaluation.metrics import normalize, substring_exact_match
from kvrag.evaluation.prompt_fit import prompt_tokens

if TYPE_CHECKING:
    from kvrag.rag_stack.pipeline import RagPipeline

PASSAGE_WORDS = 100  # the study's passage size

PROMOTION_PROMPT = (
    "Does the passage answer the question, with the given answer? Reply yes or no.\n\n"
    "Question: {question}\nAnswer: {answer}\nPassage: {passage}"
)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: list[str]
    gold_ids: list[str]  # passage ids, or document ids (their answer-bearing passages)
    gold_texts: list[str]  # passages containing one of these texts are gold
    line: int


@dataclass(frozen=True)
class BuildConfig:
    """What decides the output; a resumed build must match it."""

    negatives: int = 20
    passage_words: int = PASSAGE_WORDS
    max_tokens: int | None = 32000
    seed: int = 0
    retriever: str = ""  # the embedding model's id
    judge: str | None = None  # the judge's model name, if one checks promotions
    corpus_digest: str = ""
    tokenizer: str = ""  # the model whose tokenizer measures --max-tokens

    def __post_init__(self) -> None:
        if self.negatives < 0:
            raise ValueError(f"--negatives must be 0 or more, got {self.negatives}")
        if self.passage_words < 10:
            raise ValueError(f"--passage-words must be at least 10, got {self.passage_words}")
        if self.max_tokens is not None and self.max_tokens < 64:
            raise ValueError(f"--max-tokens must be at least 64, got {self.max_tokens}")


#: A question's lists of strings; its gold ids may also be named as in kvrag's own schema
#: (gold_doc_ids), so a kvrag set's questions are read as they are.
LIST_FIELDS = ("answers", "gold_ids", "gold_doc_ids", "gold_texts")
QUESTION_FIELDS = ("id", "question", *LIST_FIELDS)


def _question(record: object, lineno: int) -> Question:
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    for key in ("id", "question"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"'{key}' must be a non-empty string")
    lists = {}
    for key in LIST_FIELDS:
        value = record.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"'{key}' must be a list of strings")
        lists[key] = value
    if not lists["answers"]:
        raise ValueError("'answers' must hold at least one answer")
    unknown = sorted(set(record) - set(QUESTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {', '.join(QUESTION_FIELDS)}")
    return Question(record["id"], record["question"], lists["answers"],
                    lists["gold_ids"] + lists["gold_doc_ids"], lists["gold_texts"], lineno)


def read_questions(path: Path) -> list[Question]:
    """QA pairs, one JSON object per line; a bad line stops with its file and line."""
    return read_records(path, _question)


def passages(docs: list[Doc], passage_words: int) -> tuple[list[Doc], dict[str, str]]:
    """Each document cut into passages of at most ``passage_words`` words (LlamaIndex's
    sentence splitter); a passage keeps its document's title. Returns the passages and
    each passage's document id. A one-passage document keeps its id; others get
    ``ID#1``, ``ID#2``, ..."""
    out: list[Doc] = []
    source: dict[str, str] = {}
    for doc in docs:
        pieces = split_context(doc.text, passage_words)
        for k, piece in enumerate(pieces, start=1):
            pid = doc.id if len(pieces) == 1 else f"{doc.id}#{k}"
            out.append(Doc(pid, doc.title, piece.text))
            source[pid] = doc.id
    return out, source


def contains_answer(text: str, answers: list[str]) -> bool:
    """A normalised answer occurs in the normalised text, at word boundaries (SubEM)."""
    return substring_exact_match(text, answers) == 1.0


class Builder:
    """Builds one instance per question over passages already ingested in ``pipeline``."""

    def __init__(self, corpus: list[Doc], source: dict[str, str], pipeline: RagPipeline,
                 corpus_key: str, config: BuildConfig, tokenizer,
                 judge: ChatClient | None = None) -> None:
        self.corpus = {d.id: d for d in corpus}
        self.by_source: dict[str, list[str]] = {}
        for pid, doc_id in source.items():
            self.by_source.setdefault(doc_id, []).append(pid)
        self.pipeline = pipeline
        self.corpus_key = corpus_key
        self.config = config
        self.tokenizer = tokenizer
        self.judge = judge

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def gold(self, q: Question) -> list[str]:
        gold: list[str] = []
        for g in q.gold_ids:
            if g in self.corpus:
                gold.append(g)
            elif g in self.by_source:
                pids = self.by_source[g]
                hits = [p for p in pids if contains_answer(self.corpus[p].text, q.answers)]
                gold += hits or pids
            else:
                raise ValueError(f"gold id {g!r} is no passage or document of the corpus")
        for text in q.gold_texts:
            hits = [p for p, d in self.corpus.items() if normalize(text) in normalize(d.text)]
            if not hits:
                raise ValueError(f"gold text {text[:60]!r} is in no passage of the corpus")
            gold += hits
        return list(dict.fromkeys(gold))

    def _confirmed(self, q: Question, pid: str) -> bool:
        if self.judge is None:
            return True
        reply = self.judge.complete(PROMOTION_PROMPT.format(
            question=q.question, answer=" | ".join(q.answers),
            passage=self.corpus[pid].text), max_tokens=4)
        return reply.strip().lower().startswith("yes")

    def build(self, q: Question) -> Instance:
        gold = self.gold(q)
        k = self.config.negatives
        hits = (self.pipeline.top(self.corpus_key, q.question, k + len(gold), self._tokenize)
                if k else [])
        negatives = [c.doc_id for c in hits if c.doc_id not in gold][:k]
        promoted, rejected = [], []
        for pid in negatives:
            if contains_answer(self.corpus[pid].text, q.answers):
                (promoted if self._confirmed(q, pid) else rejected).append(pid)
        gold += promoted
        negatives = [p for p in negatives if p not in promoted]
        if not gold:
            raise ValueError("no gold passage: give gold_ids (or gold_doc_ids) or gold_texts, "
                             "or answers that a retrieved passage contains")
        kept = len(negatives)
        instance = self._instance(q, gold, negatives, kept, promoted, rejected)
        limit = self.config.max_tokens
        while limit is not None and kept and prompt_tokens(self.tokenizer, instance) > limit:
            kept -= max(1, kept // 8) if kept > 16 else 1
            instance = self._instance(q, gold, negatives, kept, promoted, rejected)
        if limit is not None and prompt_tokens(self.tokenizer, instance) > limit:
            raise ValueError(f"its gold passages alone make a prompt over --max-tokens {limit}")
        return instance

    def _instance(self, q: Question, gold: list[str], negatives: list[str], kept: int,
                  promoted: list[str], rejected: list[str]) -> Instance:
        ids = gold + negatives[:kept]  # negatives are in rank order: the tail goes first
        random.Random(f"{self.config.seed}\0{q.id}").shuffle(ids)
        provenance = {"retriever": self.config.retriever, "negatives": self.config.negatives,
                      "negatives_kept": kept, "promoted": promoted,
                      "promotion_rejected": rejected, "judge": self.config.judge,
                      "seed": self.config.seed, "corpus_digest": self.config.corpus_digest}
        return Instance(id=q.id, question=q.question, answers=q.answers,
                        docs=[self.corpus[p] for p in ids], gold_doc_ids=gold,
                        subset="built", provenance=provenance)


class PartialOutput:
    """Instances appended as they are built to ``OUT.partial`` (with the config beside it),
    moved to ``OUT`` when every question is done; a rerun skips what it holds."""

    def __init__(self, out: Path, config: BuildConfig) -> None:
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.config_path = out.with_name(out.name + ".partial.json")
        wanted = asdict(config)
        if self.partial.exists() and self.config_path.exists():
            held = json.loads(self.config_path.read_text())
            diffs = [f"{k} {held.get(k)!r} vs {v!r}" for k, v in wanted.items()
                     if held.get(k) != v]
            if diffs:
                raise DatasetError(
                    f"{self.partial} was built with other settings ({', '.join(diffs)}); "
                    "rerun with them, or delete it to start over")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(wanted, indent=2) + "\n")
        self.done = self._read_done()

    def _read_done(self) -> set[str]:
        done: set[str] = set()
        if not self.partial.exists():
            return done
        lines = self.partial.read_bytes().split(b"\n")
        complete = [line for line in lines[:-1] if line.strip()]  # a cut last line is redone
        self.partial.write_bytes(b"".join(line + b"\n" for line in complete))
        for line in complete:
            done.add(json.loads(line)["id"])
        return done

    def write(self, instances: Iterator[Instance]) -> int:
        n = 0
        with self.partial.open("a", encoding="utf-8") as f:
            for instance in instances:
                f.write(json.dumps(instance.to_json(), ensure_ascii=False) + "\n")
                f.flush()
                n += 1
        return n

    def finish(self) -> None:
        self.partial.replace(self.out)
        self.config_path.unlink()


def build_all(questions: list[Question], builder: Builder, path: Path,
              on_built: Callable[[Instance], None] = lambda i: None) -> Iterator[Instance]:
    """Each question built, in order; an error names the question's file and line."""
    for q in questions:
        try:
            instance = builder.build(q)
        except ValueError as e:
            raise DatasetError(f"{path}:{q.line}: question {q.id!r}: {e}") from e
        yield instance
        on_built(instance)
