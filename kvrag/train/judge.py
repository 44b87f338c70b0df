"""The ``judge`` reward's scorer: a model served over an OpenAI-compatible API.

Point it at ``kvrag serve`` (or any ``/v1`` server). The judge sees the question and the
completion, and replies with an integer 0–10 that is scaled to [0, 1]; a reply without one
scores 0 and is counted in ``unparsed``, so a judge that cannot follow the instruction
shows up in the training log instead of silently rewarding nothing.
"""

from __future__ import annotations

import re

from kvrag.evaluation.judge import ChatClient, JudgeUnavailableError

__all__ = ["JudgeUnavailableError", "ServedJudge", "parse_score"]

PROMPT = (
    "Rate the reasoning in this answer to the question: is it grounded in the documents "
    "it cites, and does it support the final answer? Reply with one integer from 0 (worst) "
    "to 10 (best).\n\nQuestion: {question}\n\nAnswer:\n{completion}"
)
_SCORE = re.compile(r"(?<![\d.])(10|\d)(?!\d|\.\d)")


def parse_score(reply: str) -> float | None:
    """The first integer 0–10 in ``reply``, scaled to [0, 1]; None if there is none."""
    match = _SCORE.search(reply)
    return None if match is None else int(match.group(1)) / 10


class ServedJudge:
    """A ``JudgeFn``: ``judge(question, completion) -> score in [0, 1]``."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 120) -> None:
        self.client = ChatClient(base_url, model, timeout)
        self.model = self.client.model
        self.calls = 0
        self.unparsed = 0

    def __call__(self, question: str, completion: str) -> float:
        text = self.client.complete(PROMPT.format(question=question, completion=completion),
                                    max_tokens=8)
        self.calls += 1
        score = parse_score(text)
        if score is None:
            self.unparsed += 1
            return 0.0
        return score
