import json
from collections import Counter
from pathlib import Path

import pytest

from kvrag.data.demo import DEMO_PATH, make_demo
from kvrag.data.loaders import load_dataset
from kvrag.data.schema import Doc, Instance, read_jsonl
from kvrag.evaluation.metrics import cited_doc_ids, extract_answer
from kvrag.train.examples import build_examples, demo_train_split
from kvrag.train.formats import FormatError, count_words

DOCS = [Doc(f"d{i}", f"Title {i}", f"Text number {i}.") for i in range(20)]


def gold_first(n: int) -> list[Instance]:
    """Instances whose gold doc (d0) comes first in the dataset's own order."""
    return [Instance(id=f"q{k}", question=f"Question {k}?", answers=["number 0"], docs=DOCS,
                     gold_doc_ids=["d0"]) for k in range(n)]


def test_gold_is_shuffled_among_distractors() -> None:
    examples = build_examples(gold_first(30), "ids", seed=0, count_tokens=count_words)
    positions = Counter(next(n for n, i in ex.prompt.doc_tags.items() if i == "d0")
                        for ex in examples)
    assert len(positions) >= 10 and positions[1] < 5, positions
    for ex in examples:
        assert sorted(ex.prompt.doc_tags) == list(range(1, 21))
        assert sorted(ex.prompt.doc_tags.values()) == sorted(d.id for d in DOCS)
        number = next(n for n, i in ex.prompt.doc_tags.items() if i == "d0")
        assert ex.target == f"Relevant documents: [DOC {number}]\nThe answer is: number 0"
        assert f"[DOC {number}] Title 0\nText number 0.\n\n" in ex.prompt.context


def test_shuffle_depends_on_seed_and_instance_id_not_list_position() -> None:
    a, b, c = gold_first(3)
    first = build_examples([a, b, c], "answer", seed=7, count_tokens=count_words)
    again = build_examples([c, b], "answer", seed=7, count_tokens=count_words)
    assert first[1] == again[1] and first[2] == again[0]
    other = build_examples([a, b, c], "answer", seed=8, count_tokens=count_words)
    assert [e.prompt.doc_tags for e in other] != [e.prompt.doc_tags for e in first]
    assert [e.id for e in first] == ["q0", "q1", "q2"] and first[0].instance is a


@pytest.mark.parametrize("fmt", ["answer", "ids", "ids+quotes", "ids+copy"])
def test_examples_parse_back_to_gold(fmt: str) -> None:
    for ex in build_examples(read_jsonl(DEMO_PATH)[:12], fmt, 3, count_words):
        assert extract_answer(ex.target) == ex.instance.answers[0]
        cited = sorted(cited_doc_ids(ex.target, ex.prompt))
        assert cited == ([] if fmt == "answer" else sorted(ex.instance.gold_doc_ids))


def write_helmet(path: Path, gold_flag: bool) -> Path:
    ctxs = [{"id": "w1", "title": "Wilkie Collins", "text": "Collins wrote The Moonstone."},
            {"id": "m0", "title": "Moonstone", "text": "The Moonstone is a novel."}]
    if gold_flag:
        ctxs[0]["isgold"] = True
    record = {"id": "nq-1", "question": "who wrote the moonstone",
              "answers": ["Wilkie Collins", "Collins"], "ctxs": ctxs}
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


def test_helmet_data_with_gold_flags_builds_cited_targets(tmp_path: Path) -> None:
    instances = load_dataset(str(write_helmet(tmp_path / "h.jsonl", gold_flag=True)))
    [ex] = build_examples(instances, "ids+quotes", seed=0, count_tokens=count_words)
    number = next(n for n, i in ex.prompt.doc_tags.items() if i == "w1")
    assert ex.target == (f'Relevant documents: [DOC {number}]\nQuotes:\n'
                         f'[DOC {number}] "Collins wrote The Moonstone."\n'
                         'The answer is: Wilkie Collins')


def test_ids_format_on_data_without_gold_ids_fails_clearly(tmp_path: Path) -> None:
    instances = load_dataset(str(write_helmet(tmp_path / "h.jsonl", gold_flag=False)))
    assert build_examples(instances, "answer", 0, count_words)[0].target == (
        "The answer is: Wilkie Collins")
    message = "instance 'nq-1' has no gold_doc_ids, but format 'ids' cites gold documents"
    with pytest.raises(FormatError, match=message):
        build_examples(instances, "ids", 0, count_words)


@pytest.fixture(scope="module")
def eval_split() -> list[Instance]:
    return read_jsonl(DEMO_PATH)


def test_demo_train_split_shares_no_question_or_id_with_eval(eval_split) -> None:
    train = demo_train_split()
    assert len(train) == 200
    assert not {i.id for i in train} & {i.id for i in eval_split}
    assert not {i.question for i in train} & {i.question for i in eval_split}
    assert len({i.question for i in train}) == len(train)
    assert Counter(i.subset for i in train) == Counter(i.subset for i in eval_split)


def test_demo_train_split_drops_questions_seen_in_eval() -> None:
    generated = make_demo(seed=1, per_task=3)
    held_out = [Instance(id=f"eval-{k}", question=g.question, answers=g.answers, docs=g.docs,
                         gold_doc_ids=g.gold_doc_ids) for k, g in enumerate(generated[:2])]
    train = demo_train_split(per_task=3, eval_instances=held_out)
    assert [i.id for i in train] == [i.id for i in generated[2:]]


def test_demo_train_split_drops_repeated_questions() -> None:
    # seed 1 repeats a finance question: instance 144 asks what instance 111 asked
    generated = {i.id: i for i in make_demo(seed=1, per_task=145)}
    assert generated["finance-1-144"].question == generated["finance-1-111"].question
    train = demo_train_split(per_task=145, eval_instances=[])
    ids = [i.id for i in train]
    assert "finance-1-144" not in ids and "finance-1-111" in ids and len(ids) == 579


def test_demo_train_split_refuses_the_eval_seed() -> None:
    with pytest.raises(ValueError, match="seed 0 is the evaluation split's seed"):
        demo_train_split(seed=0)
