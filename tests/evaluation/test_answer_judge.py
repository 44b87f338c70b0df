import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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


class _Recorder(BaseHTTPRequestHandler):
    """Records what the judge client sends; the judge model itself runs in
    tests/cli/test_serve.py, where `kvrag serve` rates compare outputs."""

    seen: list[dict] = []

    def do_GET(self):  # noqa: N802
        self._reply({"data": [{"id": "judge-model"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        self._reply({"choices": [{"message": {"content": "[[60]]"}}]})

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_judge_sees_question_gold_and_output():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = AnswerJudge(ChatClient(f"http://127.0.0.1:{server.server_port}/v1"))
        assert judge.model == "judge-model"
        assert judge("Where?", ["Oslo", "Norway"], "It is Oslo.") == 0.6
    finally:
        server.shutdown()
    body = _Recorder.seen[-1]
    text = body["messages"][0]["content"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "Where?" in text and "Oslo | Norway" in text and "It is Oslo." in text
    assert judge.calls == 1 and judge.unparsed == 0
