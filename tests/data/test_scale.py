import itertools
import json

import pytest

from kvrag.data.loaders import load_corpus, load_dataset
from kvrag.data.scale import make_loft, varied_docs
from kvrag.data.schema import Doc, docs_digest

SOURCE = [Doc("a", "Alpha", "One. Two! Three?"), Doc("b", "Beta", "Four. Five.")]


def test_variants_are_distinct_ordinary_text() -> None:
    docs = list(itertools.islice(varied_docs(SOURCE), 6))
    assert len({d.id for d in docs}) == len({(d.title, d.text) for d in docs}) == 6
    assert docs[2].text == "Two! Three? One." and docs[2].title == "Alpha #1"


def test_loft_layout_set_loads_with_one_shared_corpus(tmp_path) -> None:
    make_loft(tmp_path / "set", SOURCE, passages=50, queries=5, seed=1)
    instances = load_dataset(str(tmp_path / "set"))
    corpus = load_corpus(str(tmp_path / "set"))
    assert len(instances) == 5 and len(corpus) == 50
    assert all(i.docs is instances[0].docs for i in instances)  # one shared tuple
    assert docs_digest(corpus) == instances[0].corpus_id
    for inst in instances:
        (gold,) = inst.gold_doc_ids
        passage = next(d for d in corpus if d.id == gold)
        assert f"is {inst.answers[0]}." in passage.text
        key = inst.question.removeprefix("What is the special magic number for ")[:-1]
        assert key in passage.text
    lines = [json.loads(x) for x in (tmp_path / "set" / "dev_queries.jsonl").open()]
    assert lines[0]["metadata"]["qrels"][0][1] == 1


def test_loft_sizes_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="queries <= passages"):
        make_loft(tmp_path, SOURCE, passages=3, queries=4)
