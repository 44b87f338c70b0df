import socket

import pytest
from http_helpers import chat_stub

from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc, Instance
from kvrag.evaluation.judge import (
    JUDGE_PROMPT,
    MAX_EVIDENCE_CHARS,
    NO_EVIDENCE,
    ChatClient,
    Judge,
    JudgeCase,
    JudgeUnavailableError,
    parse_rating,
    prompt_documents,
)


@pytest.mark.parametrize(("reply", "expected"), [
    ("[[85]]", 0.85),
    ("Rating: [[100]]", 1.0),
    ("I give it 40 out of 100", 0.40),
    ("[[ 7 ]] because", 0.07),
    ("[[150]]", None),
    ("", None),
    ("good", None),
])
def test_parse_rating(reply, expected):
    assert parse_rating(reply) == expected


DOCS = [Doc("a", "Oslo", "Oslo is the capital of Norway.\n\nIt lies by a fjord."),
        Doc("b", "Rome", "Rome is in Italy."), Doc("c", "Long", "word " * 1000)]
INST = Instance("q", "Which city is the capital of Norway?", ["Oslo"], DOCS, ["a"])
PROMPT = build_prompt(INST, [(4, DOCS[1]), (7, DOCS[0]), (9, DOCS[2])])


def test_prompt_documents_are_the_blocks_as_shown():
    shown = prompt_documents(PROMPT)
    assert list(shown) == [4, 7, 9]
    assert shown[7] == "[DOC 7] Oslo\nOslo is the capital of Norway.\n\nIt lies by a fjord."


def test_the_judge_sees_question_gold_cited_documents_and_output():
    # records what the judge client sends; a served judge model runs in tests/cli/test_serve.py
    output = "[DOC 7] says so. The answer is: Oslo"
    case = JudgeCase.of(INST, PROMPT, output)
    with chat_stub("judge-model", "[[60]]") as (url, seen):
        judge = Judge(ChatClient(url))
        assert judge.model == "judge-model"
        assert judge(case) == 0.6
    body = seen[-1]
    text = body["messages"][0]["content"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert text == JUDGE_PROMPT.format(question=INST.question, gold="Oslo",
                                       evidence=prompt_documents(PROMPT)[7], output=output)
    assert "Rome is in Italy" not in text  # shown but not cited
    assert judge.calls == 1 and judge.unparsed == 0


def test_uncited_and_long_evidence():
    assert NO_EVIDENCE in JudgeCase.of(INST, PROMPT, "The answer is: Oslo").render()
    long = JudgeCase.of(INST, PROMPT, "[DOC 9] [DOC 4]").render()
    assert "word " * 200 in long and "word " * 400 not in long and " [...]" in long
    assert long.index("Rome is in Italy") > long.index("[DOC 9] Long")  # citation order
    assert len("word " * 1000) > MAX_EVIDENCE_CHARS


def test_a_reply_without_a_rating_is_counted():
    with chat_stub("judge-model", "It is good.") as (url, _):
        judge = Judge(ChatClient(url))
        assert judge(JudgeCase.of(INST, PROMPT, "x")) is None
    assert judge.calls == 1 and judge.unparsed == 1


def test_the_api_key_goes_as_a_bearer_token():
    # a judge behind `kvrag serve --api-key`; the real server is in tests/cli/test_serve.py
    with chat_stub("judge-model", "[[60]]", api_key="k3y") as (url, _):
        assert Judge(ChatClient(url, api_key="k3y"))(JudgeCase.of(INST, PROMPT, "x")) == 0.6
        with pytest.raises(JudgeUnavailableError,
                           match=r"refused the request \(401\).*--judge-api-key"):
            ChatClient(url)
        with pytest.raises(JudgeUnavailableError, match=r"\(401\)"):
            ChatClient(url, model="judge-model", api_key="wrong").complete("x", 4)


def test_unreachable_judge_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeUnavailableError, match=f"127.0.0.1:{port}.*kvrag serve"):
        ChatClient(f"http://127.0.0.1:{port}/v1", timeout=5)
