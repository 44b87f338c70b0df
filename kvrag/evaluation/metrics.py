"""Answer extraction and per-answer scores.

Normalisation follows SQuAD (lower-case, strip punctuation and articles, squeeze spaces).
For a multiple-choice instance the extracted letter is what gets scored, so SubEM, EM
and F1 all equal its accuracy there; ``accuracy`` is None for open questions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import asdict, dataclass

from kvrag.data.prompt import ANSWER_MARKER, Prompt
from kvrag.data.schema import LETTERS, Instance

_MARKER_RE = re.compile(re.escape(ANSWER_MARKER.rstrip(":")) + r"\s*:?", re.IGNORECASE)
_CITE_RE = re.compile(r"\[\s*DOC\s*(\d+)\s*\]", re.IGNORECASE)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_answer(output: str) -> str:
    """The text after the last "The answer is:", up to the end of that line.

    Without the marker the whole output's first non-empty line is the answer.
    """
    matches = list(_MARKER_RE.finditer(output))
    tail = output[matches[-1].end():] if matches else output
    for line in tail.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


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


def cited_doc_ids(output: str, prompt: Prompt) -> list[str]:
    """Doc ids of the ``[DOC i]`` tags cited in ``output`` (unknown numbers dropped)."""
    seen: list[str] = []
    for m in _CITE_RE.finditer(output):
        doc_id = prompt.doc_tags.get(int(m.group(1)))
        if doc_id is not None and doc_id not in seen:
            seen.append(doc_id)
    return seen


@dataclass(frozen=True)
class Scores:
    subem: float
    em: float
    f1: float
    accuracy: float | None
    cite_precision: float | None
    cite_recall: float | None

    def to_json(self) -> dict:
        return asdict(self)


def score(instance: Instance, output: str, prompt: Prompt) -> tuple[str, Scores]:
    """(extracted answer, scores) for one model output."""
    answer = extract_answer(output)
    if instance.task == "mc":
        letter = extract_letter(answer, len(instance.choices)) or match_choice(
            answer, instance.choices)
        correct = float(letter is not None and letter in instance.answers)
        subem = em = f1 = correct
        accuracy: float | None = correct
        answer = letter or answer
    else:
        subem = substring_exact_match(answer, instance.answers)
        em = exact_match(answer, instance.answers)
        f1 = token_f1(answer, instance.answers)
        accuracy = None
    cited = cited_doc_ids(output, prompt)
    precision = recall = None
    if cited and instance.gold_doc_ids:
        hits = len(set(cited) & set(instance.gold_doc_ids))
        precision, recall = hits / len(cited), hits / len(instance.gold_doc_ids)
    return answer, Scores(subem, em, f1, accuracy, precision, recall)
