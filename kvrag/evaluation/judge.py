"""A judge model served over an OpenAI-compatible API, and the one judge prompt that rates
an output 0-100 (Loong's protocol, grounded as the study's judge reward: the judge sees the
question, the gold answer, the documents the output cites and the output).

Compare's judge metric and GRPO's ``judge`` reward both go through ``Judge``. Point it at
``kvrag serve`` (or any ``/v1`` server), with the server's API key if it has one. A reply
without a readable rating is None and is counted in ``unparsed``, so a judge that cannot
follow the instruction shows up in the summary instead of silently scoring 0.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from kvrag.data.prompt import Prompt
from kvrag.data.schema import Instance
from kvrag.evaluation.metrics import cited_numbers


class JudgeUnavailableError(RuntimeError):
    """The judge server cannot be reached or answered something that is not the API."""


class ChatClient:
    """One chat completion at a time, greedy, from the first model the server lists (or
    ``model``); ``api_key`` is sent as ``Authorization: Bearer KEY``."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 120,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key
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
        models = self._request(urllib.request.Request(f"{self.base_url}/models",
                                                      headers=self._headers()))
        try:
            return models["data"][0]["id"]
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeUnavailableError(f"{self.base_url}/models lists no model") from e

    def _post(self, path: str, body: dict) -> dict:
        return self._request(urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self._headers()}))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, request: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code not in (401, 403):
                raise self._unavailable(e) from e
            raise JudgeUnavailableError(
                f"the judge at {self.base_url} refused the request ({e.code}): pass the key "
                "of its --api-key with --judge-api-key (or KVRAG_JUDGE_API_KEY)") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise self._unavailable(e) from e

    def _unavailable(self, error: Exception) -> JudgeUnavailableError:
        return JudgeUnavailableError(
            f"cannot use the judge at {self.base_url} ({error}); start one with "
            "`kvrag serve --model MODEL` and pass --judge-url http://HOST:PORT/v1")


#: The one judge prompt: compare's judge metric and GRPO's judge reward both ask it. As the
#: study's judge scores grounding, it is shown the documents the output cites, as the
#: model saw them (for RAG, the retrieved chunks), beside the question and gold answer.
JUDGE_PROMPT = (
    "You are a judge of answers to questions about a collection of documents. Rate the "
    "response from 0 to 100. Give 100 when its final answer agrees with the gold answer and "
    "everything it claims is supported by the documents it cites; less when the answer is "
    "incomplete or its claims are not supported by the cited documents; 0 when the answer is "
    "wrong or missing. Reply with the rating only, in the form: [[RATING]]\n\n"
    "[Question]\n{question}\n\n[Gold answer]\n{gold}\n\n"
    "[Documents the response cites]\n{evidence}\n\n"
    "[The Start of the Response]\n{output}\n[The End of the Response]"
)
#: The rating scale of ``JUDGE_PROMPT``; ratings are divided by its top to lie in [0, 1].
RATING_MAX = 100
#: A judge model's context is not the evaluated model's: at most this many cited documents,
#: each cut to this many characters, are shown.
MAX_EVIDENCE_DOCS = 8
MAX_EVIDENCE_CHARS = 1500
NO_EVIDENCE = "(none: the response cites no document)"

_BRACKETED = re.compile(r"\[\[\s*(\d{1,3})\s*\]\]")
_BARE = re.compile(r"(?<![\d.])(\d{1,3})(?![\d.]\d)")
_DOC_START = re.compile(r"^\[DOC (\d+)\] ", re.MULTILINE)


def parse_rating(reply: str) -> float | None:
    """The rating 0-100 in ``reply`` (``[[N]]`` first, else the first bare integer),
    scaled to [0, 1]; None if there is none or it is out of range."""
    match = _BRACKETED.search(reply) or _BARE.search(reply)
    if match is None or int(match.group(1)) > RATING_MAX:
        return None
    return int(match.group(1)) / RATING_MAX


def prompt_documents(prompt: Prompt) -> dict[int, str]:
    """``[DOC i]`` number -> that block of the prompt (title and text), as shown."""
    starts = list(_DOC_START.finditer(prompt.context))
    ends = [m.start() for m in starts[1:]] + [len(prompt.context)]
    return {int(m.group(1)): prompt.context[m.start():end].strip()
            for m, end in zip(starts, ends, strict=True)}


@dataclass(frozen=True)
class JudgeCase:
    """What the judge is shown about one output."""

    question: str
    golds: list[str]
    output: str
    evidence: list[str]  # the cited ``[DOC i]`` blocks, in citation order

    @classmethod
    def of(cls, instance: Instance, prompt: Prompt, output: str) -> JudgeCase:
        shown = prompt_documents(prompt)
        evidence = [shown[n] for n in cited_numbers(output) if n in shown]
        evidence = evidence[:MAX_EVIDENCE_DOCS]
        return cls(instance.question, list(instance.answers), output, evidence)

    def render(self) -> str:
        docs = [doc if len(doc) <= MAX_EVIDENCE_CHARS else doc[:MAX_EVIDENCE_CHARS] + " [...]"
                for doc in self.evidence]
        return JUDGE_PROMPT.format(question=self.question, gold=" | ".join(self.golds),
                                   evidence="\n\n".join(docs) or NO_EVIDENCE,
                                   output=self.output)


class Judge:
    """``judge(case) -> rating in [0, 1]``, or None for a reply without a readable rating
    (counted in ``unparsed``)."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.calls = 0
        self.unparsed = 0

    @property
    def model(self) -> str:
        return self.client.model

    def __call__(self, case: JudgeCase) -> float | None:
        reply = self.client.complete(case.render(), max_tokens=12)
        self.calls += 1
        rating = parse_rating(reply)
        if rating is None:
            self.unparsed += 1
        return rating
