"""The core without its extras: kvrag run where importing SGLang, the router, LlamaIndex,
Chroma, sentence-transformers or TRL fails, as in an environment that has only PyTorch,
transformers and PEFT (a GPU machine's). The core commands work; one that needs an extra
says which to install."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BLOCKED = ("sglang", "sglang_router", "llama_index", "chromadb", "sentence_transformers",
           "bm25s", "trl")

RUN_WITHOUT_EXTRAS = f"""
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
sys.argv = ["kvrag", *sys.argv[1:]]
from kvrag.cli.main import main
try:
    main()
finally:
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r}))
    print("loaded extras:", loaded, file=sys.stderr)
"""


def kvrag_without_extras(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT_EXTRAS, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_help_lists_every_command(tmp_path):
    done = kvrag_without_extras("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for command in ("compare", "serve", "bench", "rag", "train", "analyze", "data"):
        assert command in done.stdout
    assert "loaded extras: []" in done.stderr


@pytest.mark.slow
def test_compare_on_the_hf_engine_runs_without_extras(tmp_path):
    done = kvrag_without_extras(
        "compare", "--engine", "hf", "--systems", "full,snapkv:0.5", "--limit", "2",
        "--max-new-tokens", "8", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["systems"]) == {"full", "snapkv:0.5"}
    assert all(s["n"] == 2 for s in summary["systems"].values())
    assert "loaded extras: []" in done.stderr


@pytest.mark.slow
def test_the_hf_gpu_check_runs_without_extras_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    done = kvrag_without_extras(
        "bench", "gpu", "--engine", "hf", "--device", "cpu", "--shape", "tiny",
        "--prompt-tokens", "512", "--new-tokens", "8", "--repeats", "1", "--out", str(out),
        cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "gpu_hf.json").read_text())
    assert report["ratio0_same_tokens_as_full"] and report["device"] == "cpu"
    assert len(report["training"]) == 2 and (out / "gpu_hf.md").is_file()
    assert "loaded extras: []" in done.stderr


@pytest.mark.parametrize(("args", "extra"), [
    (("compare", "--systems", "full,rag:512", "--limit", "1", "--out", "run"), "rag"),
    (("rag", "query", "--corpus", "c", "a question"), "rag"),
    (("serve",), "sglang"),
    (("bench", "gpu", "--engine", "sglang", "--device", "cpu"), "sglang"),
])
def test_a_command_that_needs_an_extra_names_it(tmp_path, args, extra):
    done = kvrag_without_extras(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"pip install 'kvrag[{extra}]'" in " ".join(done.stderr.split())
