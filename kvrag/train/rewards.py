"""GRPO rewards, one small pure function per output format (as in arXiv 2601.18527).

A reward is ``reward(completion, instance, prompt) -> float`` in [0, 1]: ``prompt`` is the
prompt the completion answered, whose ``doc_tags`` map its ``[DOC i]`` numbers to doc ids.
The answer is scored as the evaluation scores it (``metrics.score``: SubEM, or the choice
letter for multiple choice). Shared rules:

- Format violation, reward 0: an empty completion, or no "The answer is" marker; for the
  citing rewards also no ``[DOC i]`` of the prompt cited before the last marker.
- Citations are the ``[DOC i]`` tags before the last marker (quote and copy lines count).
  F1 compares their doc ids with ``gold_doc_ids``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from kvrag.data.prompt import ANSWER_MARKER, Prompt
from kvrag.data.schema import Instance
from kvrag.evaluation.judge import JudgeCase
from kvrag.evaluation.metrics import cited_doc_ids, score
from kvrag.train.formats import MAX_QUOTE_TOKENS, CountTokens, count_words, require_gold

Reward = Callable[[str, Instance, Prompt], float]
# kvrag.evaluation.judge.Judge: a rating in [0, 1], None when the reply had none
JudgeFn = Callable[[JudgeCase], float | None]

_MARKER = ANSWER_MARKER.rstrip(":").lower()  # evaluation accepts the marker without colon
_QUOTE_LINE = re.compile(r'^\s*\[\s*DOC\s*(\d+)\s*\]\s*"(.*)"\s*$', re.IGNORECASE | re.MULTILINE)


def _reasoning(completion: str) -> str | None:
    """The text before the last answer marker; None when there is no marker."""
    at = completion.lower().rfind(_MARKER)
    return None if at < 0 else completion[:at]


def _answer_score(completion: str, instance: Instance, prompt: Prompt) -> float:
    return score(instance, completion, prompt)[1].subem


def _f1(cited: list[str], gold: list[str]) -> float:
    hits = len(set(cited) & set(gold))
    if hits == 0:
        return 0.0
    precision, recall = hits / len(cited), hits / len(gold)
    return 2 * precision * recall / (precision + recall)


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def _doc_texts(instance: Instance, prompt: Prompt) -> dict[int, str]:
    """``[DOC i]`` number -> that doc's text, whitespace squeezed."""
    by_id = {d.id: d.text for d in instance.docs}
    return {n: _squeeze(by_id[doc_id]) for n, doc_id in prompt.doc_tags.items()}


def reward_ao(completion: str, instance: Instance, prompt: Prompt) -> float:
    """R_AO: answer SubEM; 0 without the answer marker."""
    if _reasoning(completion) is None:
        return 0.0
    return _answer_score(completion, instance, prompt)


def _cited(name: str, completion: str, instance: Instance, prompt: Prompt) -> list[str] | None:
    """Doc ids cited before the marker; None on a format violation."""
    require_gold(instance, f"reward {name!r}")
    reasoning = _reasoning(completion)
    if reasoning is None:
        return None
    return cited_doc_ids(reasoning, prompt) or None


def reward_id(completion: str, instance: Instance, prompt: Prompt) -> float:
    """R_ID: 0.5 * F1(cited ids, gold ids) + 0.5 * answer SubEM."""
    cited = _cited("id", completion, instance, prompt)
    if cited is None:
        return 0.0
    return 0.5 * _f1(cited, instance.gold_doc_ids) + 0.5 * _answer_score(
        completion, instance, prompt)


def reward_id_copy(completion: str, instance: Instance, prompt: Prompt) -> float:
    """R_ID+C: (F1 + copied + answer SubEM) / 3.

    copied = the fraction of cited docs whose full text appears before the marker
    (whitespace differences ignored).
    """
    cited = _cited("id+c", completion, instance, prompt)
    if cited is None:
        return 0.0
    reasoning = _squeeze(_reasoning(completion) or "")
    texts = {d.id: _squeeze(d.text) for d in instance.docs}
    copied = sum(texts[doc_id] in reasoning for doc_id in cited) / len(cited)
    f1 = _f1(cited, instance.gold_doc_ids)
    return (f1 + copied + _answer_score(completion, instance, prompt)) / 3


def reward_id_quotes(
    completion: str, instance: Instance, prompt: Prompt, count_tokens: CountTokens = count_words,
) -> float:
    """R_ID+Q: (F1 + quoted + answer SubEM) / 3.

    quoted = the fraction of ``[DOC i] "span"`` lines before the marker whose span is
    non-empty, at most 30 tokens (``count_tokens``; whitespace words by default) and found
    in doc i (whitespace differences ignored); 0 when there is no such line.
    """
    cited = _cited("id+q", completion, instance, prompt)
    if cited is None:
        return 0.0
    texts = _doc_texts(instance, prompt)
    quotes = _QUOTE_LINE.findall(_reasoning(completion) or "")
    valid = sum(
        bool(span.strip()) and count_tokens(span) <= MAX_QUOTE_TOKENS
        and _squeeze(span) in texts.get(int(n), "")
        for n, span in quotes
    )
    quoted = valid / len(quotes) if quotes else 0.0
    f1 = _f1(cited, instance.gold_doc_ids)
    return (f1 + quoted + _answer_score(completion, instance, prompt)) / 3


def judge_reward(score_fn: JudgeFn) -> Reward:
    """R_R+Judge: 0.5 * judge rating + 0.5 * answer SubEM; 0 without the answer marker.

    ``score_fn`` is shown the question, the gold answers, the documents the completion
    cites and the completion (``JudgeCase``), and rates correctness and grounding in
    [0, 1]; a reply without a rating (None) counts 0. It is not called on a format
    violation.
    """

    def reward_judge(completion: str, instance: Instance, prompt: Prompt) -> float:
        if _reasoning(completion) is None:
            return 0.0
        judged = score_fn(JudgeCase.of(instance, prompt, completion))
        if judged is None:
            judged = 0.0
        if not 0.0 <= judged <= 1.0:
            raise ValueError(
                f"judge scored instance {instance.id!r} {judged}, outside [0, 1]; "
                "scale the judge's score to [0, 1]"
            )
        return 0.5 * judged + 0.5 * _answer_score(completion, instance, prompt)

    return reward_judge


REWARDS: dict[str, Reward] = {
    "ao": reward_ao, "id": reward_id, "id+c": reward_id_copy, "id+q": reward_id_quotes,
}


def get_reward(
    name: str, judge: JudgeFn | None = None, count_tokens: CountTokens = count_words
) -> Reward:
    """A reward by name; ``judge`` needs ``judge``, ``id+q`` counts quote tokens with
    ``count_tokens`` (pass the model's tokenizer in training)."""
    if name == "judge":
        if judge is None:
            raise ValueError("reward 'judge' needs a judge: a JudgeCase -> [0, 1] scoring "
                             "function (kvrag.evaluation.judge.Judge)")
        return judge_reward(judge)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {sorted([*REWARDS, 'judge'])}")
    if name == "id+q":
        return functools.partial(reward_id_quotes, count_tokens=count_tokens)
    return REWARDS[name]
