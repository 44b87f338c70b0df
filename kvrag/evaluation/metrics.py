"""Answer extraction and per-answer scores.

Normalisation follows SQuAD (lower-case, strip punctuation and articles, squeeze spaces).
For a multiple-choice instance the extracted letter is what gets scored, so SubEM, EM
and F1 all equal its accuracy there; ``accuracy`` is None for open questions. A summary
(task ``sum``) is the whole output, scored by ROUGE-L F-measure against the best reference.
Each task declares the metric that represents it (``TASK_METRICS``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache

from kvrag.data.prompt import ANSWER_MARKER, Prompt
from kvrag.data.schema import LETTERS, Instance

# Bumped whenever a rule below changes a score; a run records it so a resume cannot mix
# records scored by two rules.
SCORING_VERSION = 3

#: The score that stands for each task in summaries (``judge``, when a judge ran, is
#: reported beside it for every task).
TASK_METRICS = {"qa": "subem", "mc": "accuracy", "sum": "rouge_l"}

_MARKER_RE = re.compile(re.escape(ANSWER_MARKER.rstrip(":")) + r"\s*:?", re.IGNORECASE)
_CITE_RE = re.compile(r"\[\s*DOC\s*(\d+)\s*\]", re.IGNORECASE)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


ANSWER_SOURCES = ("marker", "earlier_marker", "before_marker", "no_marker", "whole")


@dataclass(frozen=True)
class Extraction:
    """The answer read from an output and where it came from (``ANSWER_SOURCES``).

    ``marker``: after the last "The answer is:"; ``earlier_marker``: the last marker's
    answer was empty or cut by the token limit, so an earlier marker's answer was used;
    ``before_marker``: the same, with no earlier marker, so the line before the marker;
    ``no_marker``: no marker at all, the output's first non-empty line; ``whole``: the
    whole output (a summary).
    """

    text: str
    source: str


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def extract(
    output: str, truncated: bool = False, whole: Callable[[str], bool] = lambda answer: False
) -> Extraction:
    """The answer in ``output``: the text after the last "The answer is:", to the line end.

    An answer after the last marker that is empty, or that an output cut by the token
    limit (``truncated``) ends inside, is not read: a model that answers and then repeats
    the marker is cut there most often. The text before that marker is read instead, its
    own last marker first. An answer counts as ended, not cut, at a line break or a
    sentence's end, or when ``whole(answer)`` says so (a choice letter). A cut answer is
    kept only when nothing stands before its marker.
    """
    matches = list(_MARKER_RE.finditer(output))
    if not matches:
        return Extraction(_first_line(output), "no_marker")
    last = matches[-1]
    tail = output[last.end():]
    answer = _first_line(tail)
    ended = tail.rstrip(" \t").endswith("\n") or answer.endswith((".", "!", "?"))
    cut = truncated and tail.strip() == answer and not ended and not whole(answer)
    if answer and not cut:
        return Extraction(answer, "marker")
    before = output[:last.start()]
    if len(matches) > 1:
        earlier = extract(before)  # the output went on past it, so it was not cut
        if earlier.text:
            source = "earlier_marker" if earlier.source == "marker" else earlier.source
            return Extraction(earlier.text, source)
    elif _last_line(before):
        return Extraction(_last_line(before), "before_marker")
    return Extraction(answer, "marker")


def extract_answer(output: str, truncated: bool = False) -> str:
    return extract(output, truncated).text


def extract_letter(answer: str, n_choices: int) -> str | None:
    """The choice letter in an extracted answer: "B", "(B)", "B.", "Option B: ...".

    Returns None when no single valid letter can be read.
    """
    valid = LETTERS[:n_choices]
    text = answer.strip()
    patterns = [
        rf"^\(?([{valid}])\)?(?:[.:)]|\s*$)",  # "B", "(B)", "B. text", "B) text"
        rf"\b(?:option|choice|answer)\s*\(?([{valid}])\)?\b",
        rf"^\W*([{valid}])\W*$",
    ]
    for pattern in patterns:
        m = re.search(pattern, text, re.IGNORECASE if "option" in pattern else 0)
        if m:
            return m.group(1).upper()
    return None


def match_choice(answer: str, choices: list[str]) -> str | None:
    """The letter of the one choice whose text the answer contains ("Birch forests")."""
    text = f" {normalize(answer)} "
    hits = [i for i, c in enumerate(choices) if normalize(c) and f" {normalize(c)} " in text]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(g) for g in golds))


def substring_exact_match(prediction: str, golds: list[str]) -> float:
    """1 if any normalised gold answer occurs inside the normalised prediction."""
    pred = f" {normalize(prediction)} "
    return float(any(normalize(g) and f" {normalize(g)} " in pred for g in golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    best = 0.0
    pred_tokens = normalize(prediction).split()
    for gold in golds:
        gold_tokens = normalize(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure (``rouge-score``, Porter stemming) against the best reference."""
    scorer = _rouge_scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def cited_numbers(output: str) -> list[int]:
    """The ``[DOC i]`` numbers ``output`` cites, first citation first, each once."""
    return list(dict.fromkeys(int(m.group(1)) for m in _CITE_RE.finditer(output)))


def cited_doc_ids(output: str, prompt: Prompt) -> list[str]:
    """Doc ids of the ``[DOC i]`` tags cited in ``output`` (unknown numbers dropped)."""
    seen: list[str] = []
    for number in cited_numbers(output):
        doc_id = prompt.doc_tags.get(number)
        if doc_id is not None and doc_id not in seen:
            seen.append(doc_id)
    return seen


@dataclass(frozen=True)
class Scores:
    """``subem`` reads the extracted answer (as the paper); ``subem_output`` any gold answer
    anywhere in the whole output (as HELMET scores its RAG tasks)."""

    subem: float | None
    subem_output: float | None
    em: float | None
    f1: float | None
    accuracy: float | None
    cite_precision: float | None
    cite_recall: float | None
    rouge_l: float | None = None
    judge: float | None = None  # an LLM judge's 0-100 rating, scaled to [0, 1]

    def with_judge(self, rating: float | None) -> Scores:
        return replace(self, judge=rating)

    def to_json(self) -> dict:
        return asdict(self)


def score(
    instance: Instance, output: str, prompt: Prompt, truncated: bool = False
) -> tuple[Extraction, Scores]:
    """(extracted answer, scores) for one model output; ``truncated``: generation stopped
    at the token limit. For multiple choice the extraction's text is the letter read, and
    ``subem_output`` is its accuracy too (a letter found anywhere proves nothing)."""
    rouge = None
    if instance.task == "sum":
        extraction = Extraction(output.strip(), "whole")
        subem = subem_output = em = f1 = accuracy = None
        rouge = rouge_l(extraction.text, instance.answers)
    elif instance.task == "mc":
        n = len(instance.choices)
        extraction = extract(output, truncated, lambda a: extract_letter(a, n) is not None)
        letter = extract_letter(extraction.text, n) or match_choice(
            extraction.text, instance.choices)
        correct = float(letter is not None and letter in instance.answers)
        subem = subem_output = em = f1 = correct
        accuracy = correct
        if letter:
            extraction = Extraction(letter, extraction.source)
    else:
        extraction = extract(output, truncated)
        subem = substring_exact_match(extraction.text, instance.answers)
        subem_output = substring_exact_match(output, instance.answers)
        em = exact_match(extraction.text, instance.answers)
        f1 = token_f1(extraction.text, instance.answers)
        accuracy = None
    cited = cited_doc_ids(output, prompt)
    precision = recall = None
    if cited and instance.gold_doc_ids:
        hits = len(set(cited) & set(instance.gold_doc_ids))
        precision, recall = hits / len(cited), hits / len(instance.gold_doc_ids)
    return extraction, Scores(subem, subem_output, em, f1, accuracy, precision, recall, rouge)


def task_score(record: dict) -> float | None:
    """A stored record's score under its task's metric."""
    return record["scores"].get(TASK_METRICS[record.get("task", "qa")])
