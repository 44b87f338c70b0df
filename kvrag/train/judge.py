"""The ``judge`` reward's scorer: a model served over an OpenAI-compatible API.

Point it at ``kvrag serve`` (or any ``/v1`` server). The judge sees the question and the
completion, and replies with an integer 0–10 that is scaled to [0, 1]; a reply without one
scores 0 and is counted in ``unparsed``, so a judge that cannot follow the instruction
shows up in the training log instead of silently rewarding nothing.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

PROMPT = (
    "Rate the reasoning in this answer to the question: is it grounded in the documents "
    "it cites, and does it support the final answer? Reply with one integer from 0 (worst) "
    "to 10 (best).\n\nQuestion: {question}\n\nAnswer:\n{completion}"
)
_SCORE = re.compile(r"(?<![\d.])(10|\d)(?!\d|\.\d)")


class JudgeUnavailableError(RuntimeError):
    """The judge server cannot be reached or answered something that is not the API."""


def parse_score(reply: str) -> float | None:
    """The first integer 0–10 in ``reply``, scaled to [0, 1]; None if there is none."""
    match = _SCORE.search(reply)
    return None if match is None else int(match.group(1)) / 10


class ServedJudge:
    """A ``JudgeFn``: ``judge(question, completion) -> score in [0, 1]``."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 120) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.model = model or self._first_model()
        self.calls = 0
        self.unparsed = 0

    def __call__(self, question: str, completion: str) -> float:
        reply = self._post("/chat/completions", {
            "model": self.model, "temperature": 0.0, "max_tokens": 8,
            "messages": [{"role": "user", "content": PROMPT.format(
                question=question, completion=completion)}],
        })
        self.calls += 1
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeUnavailableError(f"the judge at {self.base_url} answered without a "
                                        f"chat message: {reply!r:.200}") from e
        score = parse_score(text)
        if score is None:
            self.unparsed += 1
            return 0.0
        return score

    def _first_model(self) -> str:
        models = self._request(urllib.request.Request(f"{self.base_url}/models"))
        try:
            return models["data"][0]["id"]
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeUnavailableError(f"{self.base_url}/models lists no model") from e

    def _post(self, path: str, body: dict) -> dict:
        return self._request(urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}))

    def _request(self, request: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise JudgeUnavailableError(
                f"cannot use the judge at {self.base_url} ({e}); start one with "
                "`kvrag serve --model MODEL` and pass --judge-url http://HOST:PORT/v1") from e
