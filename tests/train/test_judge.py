import socket

import pytest

from kvrag.train.judge import JudgeUnavailableError, ServedJudge, parse_score


@pytest.mark.parametrize(("reply", "expected"), [
    ("7", 0.7),
    ("Score: 10/10", 1.0),
    ("I would say 3.", 0.3),
    ("0", 0.0),
    ("", None),
    ("excellent", None),
    ("42", None),  # not a 0-10 score
    ("2.5", None),  # not an integer
])
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


def test_unreachable_judge_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeUnavailableError, match=f"127.0.0.1:{port}.*kvrag serve"):
        ServedJudge(f"http://127.0.0.1:{port}/v1", timeout=5)
