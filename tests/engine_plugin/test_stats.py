import json

from kvrag.engine_plugin.stats import StatsLog


def test_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / "stats.jsonl"
    log = StatsLog(path)
    assert log.pop("a") is None  # no file yet
    path.write_text(json.dumps({"rid": "a", "freed": 3}) + "\n" + '{"rid": "b", "fre')
    assert log.pop("a") == {"rid": "a", "freed": 3}
    assert log.pop("a") is None  # handed out once
    assert log.pop("b") is None  # half-written line is left for later
    with open(path, "a") as f:
        f.write('ed": 5}\n' + json.dumps({"rid": "c", "freed": 1}) + "\n")
    assert log.pop("c") == {"rid": "c", "freed": 1}
    assert log.pop("b") == {"rid": "b", "freed": 5}
