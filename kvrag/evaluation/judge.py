"""A judge model served over an OpenAI-compatible API, and the answer judge that scores
compare outputs 0-100 against the gold answer (Loong's protocol: the judge sees the
question, the gold answer and the output).

Point it at ``kvrag serve`` (or any ``/v1`` server). A reply without a readable score
scores None and is counted in ``unparsed``, so a judge that cannot follow the
instruction shows up in the summary instead of silently scoring 0.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request


class JudgeUnavailableError(RuntimeError):
    """The judge server cannot be reached or answered something that is not the API."""


class ChatClient:
    """One chat completion at a time, greedy, from the first model the server lists (or
    ``model``)."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 120) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.model = model or self._first_model()

    def complete(self, prompt: str, max_tokens: int) -> str:
        reply = self._post("/chat/completions", {
            "model": self.model, "temperature": 0.0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        })
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeUnavailableError(f"the judge at {self.base_url} answered without a "
                                        f"chat message: {reply!r:.200}") from e

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


ANSWER_PROMPT = (
    "You are a judge of answers to questions. Compare the assistant's answer with the gold "
    "answer and rate how correct and complete it is, from 0 (wrong) to 100 (fully "
    "correct). Reply with the rating only, in the form: [[RATING]]\n\n"
    "[Question]\n{question}\n\n[Gold answer]\n{gold}\n\n"
    "[The Start of the Assistant's Answer]\n{output}\n[The End of the Assistant's Answer]"
)
_BRACKETED = re.compile(r"\[\[\s*(\d{1,3})\s*\]\]")
_BARE = re.compile(r"(?<![\d.])(\d{1,3})(?![\d.]\d)")


def parse_rating(reply: str) -> float | None:
    """The rating 0-100 in ``reply`` (``[[N]]`` first, else the first bare integer),
    scaled to [0, 1]; None if there is none or it is out of range."""
    match = _BRACKETED.search(reply) or _BARE.search(reply)
    if match is None or int(match.group(1)) > 100:
        return None
    return int(match.group(1)) / 100


class AnswerJudge:
    """``judge(question, golds, output) -> score in [0, 1] or None``."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.calls = 0
        self.unparsed = 0

    @property
    def model(self) -> str:
        return self.client.model

    def __call__(self, question: str, golds: list[str], output: str) -> float | None:
        reply = self.client.complete(ANSWER_PROMPT.format(
            question=question, gold=" | ".join(golds), output=output), max_tokens=12)
        self.calls += 1
        rating = parse_rating(reply)
        if rating is None:
            self.unparsed += 1
        return rating
