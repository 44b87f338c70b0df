import uuid

import pytest

from kvrag.data.schema import Doc
from kvrag.rag_stack.collection import create_collection
from kvrag.rag_stack.config import RETRIEVER_NAMES
from kvrag.rag_stack.ingest import ingest, iter_chunks
from kvrag.rag_stack.retrievers import RETRIEVERS, BM25Ranker

DOCS = [Doc(f"d{i}", f"Town {i}", f"Town {i} has a market square, a small library and a "
            "river that floods in spring.") for i in range(12)]
DOCS.insert(7, Doc("gold", "Quillon Barrow", "Quillon Barrow repairs zeppelin engines "
                   "in a hangar near the salt flats."))


@pytest.fixture()
def collection(client, embed, tokenize):
    coll = create_collection(client, f"test-{uuid.uuid4().hex}", "test")
    ingest(coll, iter_chunks(DOCS, 32, tokenize), embed)
    return coll


@pytest.mark.parametrize("name", list(RETRIEVERS))
def test_every_retriever_ranks_the_gold_passage_first(collection, embed, tmp_path,
                                                      name) -> None:
    ranker = RETRIEVERS[name](collection, embed, tmp_path)
    top = ranker.top("Who repairs zeppelin engines?", 5)
    assert top[0].doc_id == "gold" and top[0].block_tokens > 0
    assert len(top) == 5 and len({c.key for c in top}) == 5  # fused without duplicates
    assert len(ranker.top("zeppelin", 100)) == collection.count()  # k above the corpus


def test_hybrid_fuses_both_rankings_by_reciprocal_rank(collection, embed, tmp_path) -> None:
    dense = RETRIEVERS["dense"](collection, embed, tmp_path)
    bm25 = RETRIEVERS["bm25"](collection, embed, tmp_path)
    hybrid = RETRIEVERS["hybrid"](collection, embed, tmp_path)
    question = "a town whose river floods in spring"
    k = collection.count()
    rank = {name: {c.key: i for i, c in enumerate(r.top(question, k))}
            for name, r in (("dense", dense), ("bm25", bm25))}
    fused = {key: sum(1 / (60 + rank[name][key]) for name in rank) for key in rank["dense"]}
    expected = sorted(fused, key=lambda key: -fused[key])
    assert [c.key for c in hybrid.top(question, k)][:3] == expected[:3]


def test_bm25_index_is_persisted_and_rebuilt_when_the_collection_changes(
        collection, embed, tokenize, tmp_path) -> None:
    BM25Ranker(collection, tmp_path)
    stamp = tmp_path / collection.name / "kvrag.json"
    assert stamp.is_file()
    built = stamp.stat().st_mtime_ns
    again = BM25Ranker(collection, tmp_path)  # loaded, not rebuilt
    assert stamp.stat().st_mtime_ns == built and again.top("zeppelin", 1)[0].doc_id == "gold"
    extra = [Doc("new", "Ysolde Marr", "Ysolde Marr breeds albino peacocks.")]
    ingest(collection, iter_chunks(DOCS + extra, 32, tokenize), embed)
    rebuilt = BM25Ranker(collection, tmp_path)
    assert rebuilt.top("albino peacocks", 1)[0].doc_id == "new"


def test_the_light_retriever_names_are_the_registry():
    assert tuple(RETRIEVERS) == RETRIEVER_NAMES
