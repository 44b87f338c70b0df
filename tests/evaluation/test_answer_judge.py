import pytest
from http_helpers import chat_stub

from kvrag.evaluation.judge import AnswerJudge, ChatClient, parse_rating


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


def test_the_judge_sees_question_gold_and_output():
    # records what the judge client sends; a served judge model runs in tests/cli/test_serve.py
    with chat_stub("judge-model", "[[60]]") as (url, seen):
        judge = AnswerJudge(ChatClient(url))
        assert judge.model == "judge-model"
        assert judge("Where?", ["Oslo", "Norway"], "It is Oslo.") == 0.6
    body = seen[-1]
    text = body["messages"][0]["content"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "Where?" in text and "Oslo | Norway" in text and "It is Oslo." in text
    assert judge.calls == 1 and judge.unparsed == 0
