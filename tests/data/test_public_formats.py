import json
import shutil
from pathlib import Path

import pytest

from kvrag.data.loaders import LOADERS, fingerprint, load_corpus, load_dataset, sniff_format
from kvrag.data.public_formats import (
    PASSAGE_WORDS,
    count_words,
    load_infinitebench,
    load_longbench_v2,
    option_letters,
    split_context,
)
from kvrag.data.schema import DatasetError

FIXTURES = Path(__file__).parent / "fixtures"
IB_MC = FIXTURES / "infinitebench_en_mc.jsonl"
IB_QA = FIXTURES / "infinitebench_en_qa.jsonl"
IB_SUM = FIXTURES / "infinitebench_en_sum.jsonl"
LONGBENCH = FIXTURES / "longbench_v2.json"
HELMET = FIXTURES / "helmet_kilt_nq.jsonl"
LOFT_RAG = FIXTURES / "loft" / "rag" / "nq" / "128k"
LOFT_RETRIEVAL = FIXTURES / "loft" / "retrieval" / "quest" / "32k"


def test_loaders_are_registered() -> None:
    assert {"infinitebench", "longbench-v2", "loft", "helmet", "kvrag"} <= set(LOADERS)


@pytest.mark.parametrize(("path", "fmt"), [
    (IB_MC, "infinitebench"), (IB_QA, "infinitebench"), (IB_SUM, "infinitebench"),
    (LONGBENCH, "longbench-v2"), (HELMET, "helmet"), (FIXTURES / "helmet_rag.jsonl", "helmet"),
    (LOFT_RAG, "loft"), (LOFT_RAG / "dev_queries.jsonl", "loft"), (LOFT_RETRIEVAL, "loft"),
])
def test_sniff_picks_each_format(path: Path, fmt: str) -> None:
    assert sniff_format(path) == fmt


def test_sniff_falls_back_to_kvrag(tmp_path: Path) -> None:
    other_array = tmp_path / "a.json"
    other_array.write_text(json.dumps([{"question": "q"}]))
    lone_queries = tmp_path / "dev_queries.jsonl"  # no corpus.jsonl beside it
    lone_queries.write_text(json.dumps({"qid": "1", "query_text": "q", "answers": []}) + "\n")
    assert sniff_format(other_array) == "kvrag"
    assert sniff_format(lone_queries) == "kvrag"


def test_infinitebench_mc_answers_become_letters() -> None:
    instances = load_dataset(str(IB_MC))
    assert [i.task for i in instances] == ["mc"] * 3
    assert [i.subset for i in instances] == ["en.mc"] * 3
    # answer as [text], as [text, letter], and as a bare string
    assert [i.answers for i in instances] == [["B"], ["C"], ["D"]]
    assert instances[0].choices == ["Ostry", "Perdita", "Fenwick", "Quince"]
    assert instances[0].id == "0" and instances[0].gold_doc_ids == []
    assert len({i.corpus_id for i in instances}) == 1  # one book, one corpus


def test_infinitebench_qa_and_sum() -> None:
    qa = load_dataset(str(IB_QA), "infinitebench")
    assert [(i.task, i.subset) for i in qa] == [("qa", "en.qa")] * 2
    assert qa[0].answers == ["nine", "9"] and qa[0].question.startswith("How many sailors")
    (summary,) = load_dataset(str(IB_SUM))
    assert (summary.task, summary.subset) == ("sum", "en.sum")
    assert summary.question == "Summarize the following book."
    assert summary.answers[0].startswith("A lighthouse keeper")


def test_infinitebench_family_from_file_name(tmp_path: Path) -> None:
    path = tmp_path / "longdialogue_qa_eng.jsonl"
    record = json.loads(IB_SUM.read_text().splitlines()[0])  # empty input, no options
    path.write_text(json.dumps(record) + "\n")
    (inst,) = load_dataset(str(path), "infinitebench")
    assert (inst.task, inst.subset) == ("qa", "en.dia")  # not sum: the name says En.Dia
    assert "$$MASK$$" in inst.question


def test_infinitebench_passages_and_bad_line(tmp_path: Path) -> None:
    instances = load_infinitebench(IB_MC, passage_words=20)
    docs = instances[0].docs
    assert len(docs) > 3 and [d.id for d in docs][:3] == ["p1", "p2", "p3"]
    assert all(d.title == "" and len(count_words(d.text)) <= 20 for d in docs)
    bad = tmp_path / "ib.jsonl"
    first = json.loads(IB_MC.read_text().splitlines()[0])
    bad.write_text(json.dumps(first) + "\n" + json.dumps({**first, "id": 5, "answer": ["Oslo"]}))
    with pytest.raises(DatasetError, match=r"ib\.jsonl:2: answer 'Oslo' is none of the 4"):
        load_dataset(str(bad))


def test_option_letters_rejects_unknown_letter() -> None:
    assert option_letters(["B"], ["x", "y"]) == ["B"]
    with pytest.raises(ValueError, match="none of the 2 options"):
        option_letters(["C"], ["x", "y"])


def test_longbench_v2_fields() -> None:
    instances = load_dataset(str(LONGBENCH))
    first, second = instances
    assert first.id == "66f0a1b2c3d4e5f601234567" and first.task == "mc"
    assert first.answers == ["B"] and first.choices[1] == "It points toward Ostry."
    assert [i.subset for i in instances] == ["Single-Document QA", "Code Repository Understanding"]
    assert "def load_tides(path)" in second.docs[0].text


def test_longbench_v2_errors_name_item_and_position(tmp_path: Path) -> None:
    items = json.loads(LONGBENCH.read_text())
    bad = tmp_path / "lb.json"
    bad.write_text(json.dumps([items[0], items[1], {**items[1], "_id": "x", "answer": "E"}]))
    with pytest.raises(DatasetError, match=r"lb\.json: item 2: mc 'answers' must be choice"):
        load_dataset(str(bad))
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([items[0], items[0]]))
    with pytest.raises(DatasetError, match=r"dup\.json: item 1: duplicate id .*first at item 0"):
        load_dataset(str(dup))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"_id": "a",\n   "question" "q"}\n]')
    with pytest.raises(DatasetError, match=r"broken\.json:3:\d+: invalid JSON"):
        load_longbench_v2(broken)


def test_split_context_loses_no_words() -> None:
    sentence = "The keeper climbed {n} iron steps. Did the lamp burn? It did!\n"
    paragraphs = ["".join(sentence.format(n=i * 7 + j) for j in range(9)) for i in range(300)]
    context = "\n\n".join(paragraphs) + " " + " ".join(["unbroken"] * 1500)
    docs = split_context(context, passage_words=120)
    assert " ".join(d.text for d in docs).split() == context.split()
    assert all(len(count_words(d.text)) <= 120 for d in docs)
    assert len(docs) >= len(count_words(context)) // 120
    assert [d.id for d in docs] == [f"p{i}" for i in range(1, len(docs) + 1)]
    assert PASSAGE_WORDS >= 100


def test_split_context_counts_cjk_characters() -> None:
    context = "灯塔守护者爬上了铁楼梯。" * 200
    docs = split_context(context, passage_words=100)
    assert len(docs) > 10 and "".join(d.text for d in docs) == context


def test_loft_rag_shares_the_corpus() -> None:
    instances = load_dataset(str(LOFT_RAG))
    assert [i.id for i in instances] == ["dev7", "dev12"]
    assert instances[0].answers == ["Marla Quince", "Marla"]
    assert instances[0].question == "who kept the lighthouse at fenwick point"  # stripped
    assert [i.gold_doc_ids for i in instances] == [["doc101"], ["doc103"]]
    assert [d.id for d in instances[0].docs] == ["doc101", "doc102", "doc103"]
    assert instances[0].docs[0].title == "Fenwick Point"
    assert instances[0].docs[0].text.startswith("Fenwick Point is")
    assert instances[0].corpus_id == instances[1].corpus_id
    assert {i.subset for i in instances} == {"rag.nq"} and {i.task for i in instances} == {"qa"}


def test_a_loft_sets_corpus_is_the_shared_corpus_rag_retrieves_from() -> None:
    corpus = load_corpus(str(LOFT_RAG))
    assert corpus == load_dataset(str(LOFT_RAG))[0].docs
    assert load_corpus(str(LOFT_RAG / "dev_queries.jsonl")) == corpus
    assert load_corpus(str(HELMET)) is None  # a question's own documents only


def test_loft_retrieval_answers_are_gold_titles() -> None:
    (inst,) = load_dataset(str(LOFT_RETRIEVAL / "dev_queries.jsonl"), "loft")
    assert inst.gold_doc_ids == ["quest_1_0", "quest_2_0"]
    assert inst.answers == ["The Salt Lantern", "Nine Sailors"]
    assert inst.subset == "retrieval.quest"


def test_loft_errors_name_file_and_line(tmp_path: Path) -> None:
    shutil.copytree(LOFT_RAG, tmp_path / "set")
    queries = tmp_path / "set" / "dev_queries.jsonl"
    extra = {"qid": "dev99", "query_text": "q", "metadata": {"qrels": [["doc999", 1]]},
             "answers": ["a"]}
    queries.write_text(queries.read_text() + json.dumps(extra) + "\n")
    with pytest.raises(DatasetError, match=r"dev_queries\.jsonl:3: gold_doc_ids \['doc999'\]"):
        load_dataset(str(tmp_path / "set"))
    corpus = tmp_path / "set" / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"pid": "doc104", "metadata": {}}) + "\n")
    with pytest.raises(DatasetError, match=r"corpus\.jsonl:4: 'title_text' must be a string"):
        load_dataset(str(tmp_path / "set"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="a LOFT directory needs one of"):
        load_dataset(str(tmp_path / "empty"))


def test_loft_fingerprint_covers_the_corpus(tmp_path: Path) -> None:
    shutil.copytree(LOFT_RAG, tmp_path / "set")
    before = fingerprint(str(tmp_path / "set"))
    assert fingerprint(str(tmp_path / "set" / "dev_queries.jsonl")) == before
    corpus = tmp_path / "set" / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("kelp bread", "rye bread"))
    assert fingerprint(str(tmp_path / "set")) != before


def test_helmet_kilt_layout() -> None:
    first, second = load_dataset(str(HELMET))
    assert first.id == "line1" and first.answers == ["Ilse Varro", "Varro"]
    assert [d.title for d in first.docs] == ["Fenwick Chapel", "Ilse Varro", "Ostry"]
    assert first.gold_doc_ids == ["ctx1"] and second.gold_doc_ids == ["ctx0"]
    assert "Varro Bridge" not in [d.title for d in first.docs]  # hard negatives ignored


def test_helmet_duplicate_ctx_ids_fall_back_to_positions(tmp_path: Path) -> None:
    record = {"id": 17, "question": "q", "answers": ["a"], "ctxs": [
        {"id": "w1", "title": "A", "text": "a", "has_answer": True},
        {"id": "w1", "title": "A", "text": "a", "has_answer": True},
        {"id": "w2", "title": "B", "text": "b", "has_answer": False}]}
    path = tmp_path / "popqa.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (inst,) = load_dataset(str(path))
    assert inst.id == "17"
    assert [d.id for d in inst.docs] == ["ctx0", "ctx1", "ctx2"]
    assert inst.gold_doc_ids == ["ctx0", "ctx1"]
