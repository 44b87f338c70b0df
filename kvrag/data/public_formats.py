"""Loaders for public long-context benchmarks, registered in ``kvrag.data.registry.LOADERS``.

* ``infinitebench``: one task's JSONL file from InfiniteBench (OpenBMB), e.g.
  ``longbook_choice_eng.jsonl``.
* ``longbench-v2``: LongBench v2's ``data.json`` (THUDM), a JSON array.
* ``loft``: one LOFT (google-deepmind) text retrieval or RAG directory holding
  ``corpus.jsonl`` and ``{dev,test,few_shot}_queries.jsonl``.

Benchmarks that give one long ``context`` string are cut into passages (``split_context``)
so that the full-context, compressed and RAG systems all see the same documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from kvrag.data.registry import register_loader
from kvrag.data.schema import (
    LETTERS,
    DatasetError,
    Doc,
    Instance,
    parse_instance,
    read_records,
)
from kvrag.extras import require

# Passage size, in words, for contexts given as one string. InfiniteBench books run to
# 100k-200k words, so this makes a few hundred passages per book: small enough for RAG
# to retrieve, few enough that the ``[DOC i]`` headers cost little.
PASSAGE_WORDS = 500

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
# After ., ! or ? that precede whitespace, or after a CJK full stop, ! or ?.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=[。！？])")


def count_words(text: str) -> list[str]:
    """Whitespace-separated words, each CJK character counted as one word (Chinese and
    Japanese have no spaces, so ``str.split`` would make a paragraph one word)."""
    return _WORD.findall(text)


def _sentences(text: str) -> list[str]:
    """A linear-time sentence split whose pieces concatenate back to ``text``.

    Replaces LlamaIndex's default NLTK punkt splitter, whose regexes run under a
    wall-clock limit that a book-length paragraph exceeds. It knows no abbreviations, so
    "Mr. Smith" is two sentences; that only moves a passage boundary.
    """
    return [piece for piece in _SENTENCE_END.split(text) if piece]


def split_context(context: str, passage_words: int = PASSAGE_WORDS) -> list[Doc]:
    """Cut one long context into passages of at most ``passage_words`` words (as counted by
    ``count_words``), ending at sentence or paragraph breaks where possible.

    Ids are ``p1``, ``p2``, ... and titles are empty. No text is dropped except the
    whitespace at passage boundaries; passages do not overlap.
    """
    require("rag", "splitting a long context into passages (InfiniteBench, LongBench v2)")
    from llama_index.core.node_parser import SentenceSplitter

    splitter = SentenceSplitter(
        chunk_size=passage_words, chunk_overlap=0, tokenizer=count_words,
        paragraph_separator="\n\n", chunking_tokenizer_fn=_sentences,
    )
    texts = splitter.split_text(context) if context.strip() else []
    return [Doc(id=f"p{i}", title="", text=t) for i, t in enumerate(texts, start=1)]


class _Passages:
    """``split_context`` memoised per context: questions over the same book get the same
    passage list (one corpus, so one compressed cache)."""

    def __init__(self, passage_words: int) -> None:
        self.passage_words = passage_words
        self._seen: dict[str, list[dict]] = {}

    def __call__(self, context: object) -> list[dict]:
        if not isinstance(context, str) or not context.strip():
            raise ValueError("'context' must be a non-empty string")
        if context not in self._seen:
            self._seen[context] = [
                {"id": d.id, "title": d.title, "text": d.text}
                for d in split_context(context, self.passage_words)
            ]
        return self._seen[context]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# ---------------------------------------------------------------- InfiniteBench

# InfiniteBench's file stems (src/eval_utils.py DATA_NAME_TO_PATH) -> its task names.
INFINITEBENCH_FAMILIES = {
    "longbook_sum_eng": "en.sum", "longbook_choice_eng": "en.mc",
    "longbook_qa_eng": "en.qa", "longbook_qa_chn": "zh.qa",
    "longdialogue_qa_eng": "en.dia", "code_debug": "code.debug", "code_run": "code.run",
    "math_calc": "math.calc", "math_find": "math.find", "passkey": "retrieve.passkey",
    "number_string": "retrieve.number", "kv_retrieval": "retrieve.kv",
}
# Questions for the tasks whose prompt template ignores ``input`` (src/prompt.py).
INFINITEBENCH_QUESTIONS = {
    "en.sum": "Summarize the following book.",
    "en.dia": 'Which character is most likely "$$MASK$$"? Give the name used by the '
              "scriptwriter.",
    "code.debug": "Which function has a deliberate error?",
}


def infinitebench_family(path: Path) -> str | None:
    """The task family named by an InfiniteBench file name, e.g. ``en.mc`` for
    ``longbook_choice_eng.jsonl`` (or ``my_longbook_choice_eng_sample.jsonl``); None for
    an unknown name."""
    for stem in sorted(INFINITEBENCH_FAMILIES, key=len, reverse=True):
        if stem in path.stem:
            return INFINITEBENCH_FAMILIES[stem]
    return None


def _answer_strings(value: object) -> list[str]:
    """InfiniteBench ``answer``: a list of strings (numbers for Math.Find), or one string."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        value = [value]
    _require(isinstance(value, list) and len(value) > 0
             and all(isinstance(v, str | int | float) and not isinstance(v, bool)
                     for v in value),
             "'answer' must be a string, a number or a non-empty list of them")
    return [str(v) for v in value]


def option_letters(answers: list[str], options: list[str]) -> list[str]:
    """The letters of the options an InfiniteBench mc answer names.

    InfiniteBench stores the option text (``["Walking Georgie"]``), sometimes followed by
    its letter (``["Walking Georgie", "A"]``, see ``get_answer`` in src/eval_utils.py);
    texts are matched exactly, then ignoring surrounding whitespace.
    """
    valid = LETTERS[: len(options)]
    letters: list[str] = []
    for answer in answers:
        hits = [i for i, o in enumerate(options) if o == answer] or \
            [i for i, o in enumerate(options) if o.strip() == answer.strip()]
        found = [LETTERS[i] for i in hits]
        if not found and answer.strip() in valid and len(answer.strip()) == 1:
            found = [answer.strip()]
        _require(bool(found), f"answer {answer!r} is none of the {len(options)} options")
        letters += [x for x in found if x not in letters]
    return letters


def _infinitebench_task(record: dict, family: str | None) -> tuple[str, str]:
    """(task, subset): mc when there are options, sum for En.Sum, else qa. A file with an
    unknown name gets its family from the content: en.mc, en.sum (no input) or en.qa."""
    options = record.get("options") or []
    question = record.get("input")
    if family is None:
        family = "en.mc" if options else "en.qa" if question else "en.sum"
    if options:
        return "mc", family
    return ("sum" if family == "en.sum" else "qa"), family


def _infinitebench_record(record: object, family: str | None, passages: _Passages) -> Instance:
    _require(isinstance(record, dict), "each line must be a JSON object")
    assert isinstance(record, dict)
    missing = [k for k in ("id", "context", "input", "answer") if k not in record]
    _require(not missing, f"an InfiniteBench record needs {missing}")
    options = record.get("options") or []
    _require(isinstance(options, list) and all(isinstance(o, str) for o in options),
             "'options' must be a list of strings")
    _require(isinstance(record["input"], str), "'input' must be a string")
    task, subset = _infinitebench_task(record, family)
    question = record["input"].strip() or INFINITEBENCH_QUESTIONS.get(subset, "")
    _require(bool(question), f"'input' is empty and {subset} has no default question")
    answers = _answer_strings(record["answer"])
    if task == "mc":
        answers = option_letters(answers, options)
    return parse_instance({
        "id": str(record["id"]), "question": question, "answers": answers,
        "docs": passages(record["context"]), "gold_doc_ids": [], "task": task,
        "subset": subset, **({"choices": options} if task == "mc" else {}),
    })


@register_loader("infinitebench")
def load_infinitebench(path: Path, passage_words: int = PASSAGE_WORDS) -> list[Instance]:
    """One InfiniteBench task file: JSONL of ``{"id": int, "context": str, "input": str,
    "answer": [str], "options": [str]}``.

    ``options`` non-empty -> task "mc" (answers become option letters); En.Sum (empty
    ``input``) -> task "sum" asked "Summarize the following book."; otherwise "qa". The
    subset is the task family from the file name (``INFINITEBENCH_FAMILIES``), else
    guessed from the content as en.mc / en.sum / en.qa. The context is split into
    passages; InfiniteBench marks no gold passage, so ``gold_doc_ids`` is empty. Math.Calc
    (answers are lists of numbers) is not supported.
    """
    family, passages = infinitebench_family(path), _Passages(passage_words)
    return read_records(path, lambda record, lineno: _infinitebench_record(
        record, family, passages))


# ---------------------------------------------------------------- LongBench v2

LONGBENCH_CHOICES = ("choice_A", "choice_B", "choice_C", "choice_D")


def _longbench_item(item: object, passages: _Passages) -> Instance:
    _require(isinstance(item, dict), "each item must be a JSON object")
    assert isinstance(item, dict)
    missing = [k for k in ("_id", "question", *LONGBENCH_CHOICES, "answer", "context")
               if k not in item]
    _require(not missing, f"a LongBench v2 item needs {missing}")
    _require(all(isinstance(item[c], str) for c in LONGBENCH_CHOICES),
             "choice_A..choice_D must be strings")
    domain = item.get("domain", "")
    _require(isinstance(domain, str), "'domain' must be a string")
    return parse_instance({
        "id": str(item["_id"]), "question": item["question"], "answers": [item["answer"]],
        "docs": passages(item["context"]), "gold_doc_ids": [], "task": "mc",
        "choices": [item[c] for c in LONGBENCH_CHOICES], "subset": domain,
    })


def _read_json_array(path: Path) -> list:
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from e
    if not isinstance(items, list):
        raise DatasetError(f"{path}: expected a JSON array of items")
    if not items:
        raise DatasetError(f"{path}: the file holds no instances")
    return items


def read_items(path: Path, to_item: Callable[[object], Instance]) -> list[Instance]:
    """Validate every item of a JSON array file; errors name the file and item index."""
    instances: list[Instance] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(_read_json_array(path)):
        try:
            inst = to_item(item)
        except ValueError as e:
            raise DatasetError(f"{path}: item {index}: {e}") from e
        if inst.id in seen:
            raise DatasetError(f"{path}: item {index}: duplicate id {inst.id!r} "
                               f"(first at item {seen[inst.id]})")
        seen[inst.id] = index
        instances.append(inst)
    return instances


@register_loader("longbench-v2")
def load_longbench_v2(path: Path, passage_words: int = PASSAGE_WORDS) -> list[Instance]:
    """LongBench v2 ``data.json``: a JSON array of ``{"_id", "domain", "sub_domain",
    "difficulty", "length", "question", "choice_A".."choice_D", "answer": "A"-"D",
    "context"}``.

    Every item is task "mc" with subset = ``domain``; ``difficulty``, ``length`` and
    ``sub_domain`` (LongBench's other score breakdowns) are dropped. The context is split
    into passages; no gold passage is marked. The whole file is read into memory.
    """
    passages = _Passages(passage_words)
    return read_items(path, lambda item: _longbench_item(item, passages))


# ---------------------------------------------------------------- LOFT

LOFT_QUERY_FILES = ("dev_queries.jsonl", "test_queries.jsonl")
_LOFT_LENGTH = re.compile(r"^\d+[km]$")


def loft_files(path: Path) -> tuple[Path, Path]:
    """(queries file, corpus file) for a LOFT directory (its ``dev_queries.jsonl``, else
    ``test_queries.jsonl``, as LOFT's run_inference defaults to the dev split) or for a
    queries file with ``corpus.jsonl`` beside it."""
    folder = path if path.is_dir() else path.parent
    corpus = folder / "corpus.jsonl"
    if path.is_dir():
        found = [folder / name for name in LOFT_QUERY_FILES if (folder / name).is_file()]
        if not found:
            raise DatasetError(f"{path}: a LOFT directory needs one of {list(LOFT_QUERY_FILES)}")
        path = found[0]
    if not corpus.is_file():
        raise DatasetError(f"{corpus}: no such file (a LOFT queries file needs corpus.jsonl "
                           "beside it)")
    return path, corpus


def loft_corpus(path: Path) -> tuple[Doc, ...]:
    """A LOFT set's passages (``corpus.jsonl``), in file order, as one shared tuple."""
    return tuple(read_records(loft_files(path)[1], _loft_passage))


def _loft_passage(record: object, lineno: int) -> Doc:
    _require(isinstance(record, dict), "each line must be a JSON object")
    assert isinstance(record, dict)
    _require(isinstance(record.get("pid"), str), "'pid' must be a string")
    for key in ("title_text", "passage_text"):
        _require(isinstance(record.get(key), str),
                 f"'{key}' must be a string (some LOFT sets need LOFT's preprocess.py "
                 "to fill it in)")
    return Doc(id=record["pid"], title=record["title_text"].strip(),
               text=record["passage_text"].strip())


def _is_pid_pair(answer: object) -> bool:
    return isinstance(answer, list) and len(answer) == 2 and isinstance(answer[0], str) \
        and isinstance(answer[1], int)


def _loft_gold(record: dict) -> list[str]:
    """Gold pids: ``metadata.qrels`` when present, else the retrieval answers' pids (as
    prompts/prompt_registry.py takes them)."""
    qrels = (record.get("metadata") or {}).get("qrels")
    if qrels is None:
        qrels = [a for a in record["answers"] if _is_pid_pair(a)]
    _require(isinstance(qrels, list) and all(_is_pid_pair(q) for q in qrels),
             "'metadata.qrels' must be a list of [pid, score] pairs")
    return list(dict.fromkeys(pid for pid, _ in qrels))


def _loft_answers(record: dict, titles: dict[str, str]) -> tuple[str, list[str]]:
    """(kind, answers): "rag" answers are the answer strings; "retrieval" answers (all
    [pid, score] pairs) become the gold passages' titles, or pids where untitled."""
    answers = record["answers"]
    _require(isinstance(answers, list) and len(answers) > 0, "'answers' must be a non-empty list")
    if all(_is_pid_pair(a) for a in answers):
        return "retrieval", [titles.get(pid) or pid for pid, _ in answers]
    _require(all(isinstance(a, str) for a in answers),
             "'answers' must be answer strings (RAG) or [pid, score] pairs (retrieval)")
    return "rag", [a.strip() for a in answers]


def _loft_name(queries: Path) -> str:
    """The dataset name: the folder, or its parent for LOFT's length folders (``128k``)."""
    folder = queries.resolve().parent
    return folder.parent.name if _LOFT_LENGTH.match(folder.name) else folder.name


def _loft_record(record: object, by_pid: dict[str, dict], titles: dict[str, str],
                 name: str) -> Instance:
    """The query as an instance over its gold passages (checked as any instance is); the
    caller gives it the whole corpus, which is checked once, not per query."""
    _require(isinstance(record, dict), "each line must be a JSON object")
    assert isinstance(record, dict)
    missing = [k for k in ("qid", "query_text", "answers") if k not in record]
    _require(not missing, f"a LOFT query needs {missing}")
    _require(not isinstance(record["query_text"], list),
             "multi-turn LOFT queries (TopiOCQA) are not supported")
    _require(isinstance(record["query_text"], str),
             "'query_text' must be a string (some LOFT sets need LOFT's preprocess.py)")
    kind, answers = _loft_answers(record, titles)
    gold = _loft_gold(record)
    docs = [by_pid[pid] for pid in gold if pid in by_pid] or [next(iter(by_pid.values()))]
    return parse_instance({
        "id": str(record["qid"]), "question": record["query_text"].strip(),
        "answers": answers, "docs": docs, "gold_doc_ids": gold,
        "task": "qa", "subset": f"{kind}.{name}",
    })


@register_loader("loft")
def load_loft(path: Path) -> list[Instance]:
    """A LOFT text retrieval or RAG set. ``corpus.jsonl``: ``{"pid", "title_text",
    "passage_text", "metadata"}``; queries: ``{"qid", "query_text", "answers",
    "metadata": {"qrels": [[pid, score]], ...}}``.

    Every query becomes a "qa" instance over the WHOLE corpus, in file order, shared by
    all queries (one ``corpus_id``); ``gold_doc_ids`` are the qrels pids. RAG sets keep
    their answer strings. Retrieval sets, which LOFT scores by recall of the predicted
    pids, get the gold passages' titles as answers (the prompt shows titles, not pids;
    an untitled passage's answer is its pid, which no model can see); LOFT's pid recall
    corresponds to kvrag's citation recall against ``gold_doc_ids``. kvrag's qa metric
    credits any one answer, where LOFT's multi-value sets (QUEST, QAMPARI) want all.
    Texts are stripped as LOFT does; its blacklisted-word removal is not applied.
    Multi-turn (TopiOCQA), SQL, ICL and multimodal sets are not supported.
    """
    queries, _ = loft_files(path)
    passages = loft_corpus(path)
    by_pid = {d.id: {"id": d.id, "title": d.title, "text": d.text} for d in passages}
    if len(by_pid) != len(passages):
        raise DatasetError(f"{loft_files(path)[1]}: pids must be unique")
    titles = {d.id: d.title for d in passages}
    name = _loft_name(queries)
    instances = read_records(queries, lambda record, lineno: _loft_record(
        record, by_pid, titles, name))
    return [replace(inst, docs=passages) for inst in instances]
