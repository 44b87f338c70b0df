import re
from pathlib import Path

import pytest

from kvrag.data.demo import estimate_tokens
from kvrag.data.needles import KINDS, TASKS, NeedleConfig, folder_passages, make_needles
from kvrag.data.schema import DatasetError


def _needle_docs(instance):
    return [d for d in instance.docs if "special magic" in d.text]


def test_multikey_corpora_share_a_haystack_with_one_question_per_needle() -> None:
    cfg = NeedleConfig(context_tokens=1500, corpora=3, needles=4)
    suite = list(make_needles(cfg))
    assert suite == list(make_needles(cfg))  # deterministic
    assert len(suite) == 12 and len({i.corpus_id for i in suite}) == 3
    for instance in suite:
        assert estimate_tokens("".join(d.title + d.text for d in instance.docs)) >= 1500
        value = instance.answers[0]
        assert re.fullmatch(r"\d{7}", value)
        key = re.search(r"number for (\S+) mentioned", instance.question).group(1)
        gold = [d for d in instance.docs if d.id in instance.gold_doc_ids]
        assert [d.text.count(f"The special magic number for {key} is {value}.")
                for d in gold] == [1]
        # the corpus's other needles have other keys and values, in other documents
        assert len(_needle_docs(instance)) == 4
        assert sum(d.text.count(value) for d in instance.docs) == 1


def test_needles_sit_at_spread_depths() -> None:
    instance = next(make_needles(NeedleConfig(context_tokens=3000, corpora=1, needles=4)))
    docs = [d.id for d in instance.docs]
    depths = [docs.index(d.id) / len(docs) for d in _needle_docs(instance)]
    assert depths == instance.provenance["depths"]
    assert [round(d * 4 - 0.5) for d in depths] == [0, 1, 2, 3]


def test_every_task_and_kind() -> None:
    suite = list(make_needles(NeedleConfig(context_tokens=800, corpora=2, needles=3,
                                           tasks=TASKS, kinds=KINDS)))
    groups = {i.subset for i in suite}
    assert groups == {f"{t}_{k}" for t in TASKS for k in KINDS}
    single = [i for i in suite if i.subset.startswith("single")]
    assert len(single) == 6 and all(len(_needle_docs(i)) == 1 for i in single)
    multivalue = [i for i in suite if i.subset == "multivalue_name"]
    assert len(multivalue) == 2
    for instance in multivalue:
        values = instance.answers[0].split(", ")
        assert len(values) == 3 and len(instance.gold_doc_ids) == 3
        text = " ".join(d.text for d in instance.docs)
        assert [text.index(v) for v in values] == sorted(text.index(v) for v in values)
    words = [i.answers[0] for i in suite if i.subset == "multikey_word"]
    assert all(w.isalpha() and w.islower() for w in words)


def test_a_text_folder_is_the_haystack(tmp_path: Path) -> None:
    (tmp_path / "essay.txt").write_text("\n\n".join(
        f"Paragraph {i} says something ordinary about gardens. It ends here." for i in range(80)))
    (tmp_path / "notes.md").write_text("A short note.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    passages = folder_passages(tmp_path, doc_tokens=50)
    assert {t.split(" (")[0] for t, _ in passages} == {"essay", "notes"}
    assert all(estimate_tokens(text) < 70 for _, text in passages)
    suite = list(make_needles(NeedleConfig(context_tokens=600, corpora=1, needles=2),
                              passages))
    assert all("gardens" in i.docs[0].text or "note" in i.docs[0].text for i in suite)


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no .txt or .md files"):
        folder_passages(tmp_path, 50)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DatasetError, match="bad.txt: not UTF-8"):
        folder_passages(tmp_path, 50)
    with pytest.raises(ValueError, match="tasks: single, multikey, multivalue"):
        NeedleConfig(tasks=("multikeys",))
    with pytest.raises(ValueError, match="raise --context-tokens"):
        list(make_needles(NeedleConfig(context_tokens=100, needles=40)))


def test_the_bundled_first_run_suite_is_reproducible() -> None:
    from kvrag.data.loaders import load_dataset
    from kvrag.data.needles import FIRST_RUN, make_needles

    shipped = load_dataset("needles")
    assert list(make_needles(FIRST_RUN)) == shipped
    assert len(shipped) == 24 and len({i.corpus_id for i in shipped}) == 6
