import uuid
from dataclasses import replace

import pytest

from kvrag.data.schema import Doc
from kvrag.rag_stack.chroma import ChromaUnavailableError, open_client
from kvrag.rag_stack.chunk import Chunk
from kvrag.rag_stack.collection import create_collection, min_block_tokens
from kvrag.rag_stack.ingest import ingest, iter_chunks
from kvrag.rag_stack.retrieve import first_page, retrieve
from kvrag.rag_stack.retrievers import DenseRanker

FILLER = ["The river festival draws visitors every spring.",
          "Old maps show a road that no longer exists.",
          "The library keeps records of local weather.",
          "A bakery on the square sells rye bread.",
          "The council meets on the first Monday."]
DOCS = [Doc(f"d{i}", f"Town {i}", " ".join(FILLER[(i + j) % 5] for j in range(6)))
        for i in range(8)]
DOCS.insert(5, Doc("gold", "Mirela Voss", "Mirela Voss keeps a tortoise named Captain Pike."))


@pytest.fixture()
def collection(client, embed, tokenize):
    coll = create_collection(client, f"test-{uuid.uuid4().hex}", "test")
    ingest(coll, iter_chunks(DOCS, 32, tokenize), embed)
    return coll


class Spy:
    """A ranker that records the k it was asked for."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.asked: list[int] = []

    def top(self, question: str, k: int) -> list[Chunk]:
        self.asked.append(k)
        return self.inner.top(question, k)


def test_finds_the_planted_fact(collection, embed, tokenize) -> None:
    chunks = retrieve(DenseRanker(collection, embed),
                      "What is the name of Mirela Voss's tortoise?", 60,
                      lambda t: len(tokenize(t)), chunk_tokens=32)
    assert chunks[0].doc_id == "gold" and chunks[0].doc_number == 6
    assert "Captain Pike" in chunks[0].text


@pytest.mark.parametrize("budget", [1, 40, 100, 333])
def test_budget_respected_and_the_stop_rule_followed(collection, embed, tokenize,
                                                      budget) -> None:
    count = lambda t: len(tokenize(t))  # noqa: E731
    ranker = Spy(DenseRanker(collection, embed))
    smallest = min_block_tokens(collection)
    chunks = retrieve(ranker, "river festival", budget, count, chunk_tokens=32,
                      min_block=smallest)
    assert count("".join(c.block() for c in chunks)) <= budget
    # the rule, replayed on the whole ranking: take what fits, skip what does not, stop
    # below the smallest block or after k0 skips
    k0, used, skipped, expected = first_page(budget, 32), 0, 0, []
    for chunk in ranker.inner.top("river festival", collection.count()):
        if used + chunk.block_tokens <= budget:
            expected.append(chunk.key)
            used += chunk.block_tokens
        else:
            skipped += 1
        if budget - used < smallest or skipped >= k0:
            break
    assert [c.key for c in chunks] == expected
    assert ranker.asked[0] == k0


def test_the_store_is_asked_for_pages_not_the_whole_corpus(client, embed, tokenize) -> None:
    many = [Doc(f"m{i}", f"Note {i}", f"Note {i} records that shipment {i} left the harbour "
                "on time with its crates of rye bread and maps.") for i in range(120)]
    coll = create_collection(client, f"test-{uuid.uuid4().hex}", "test")
    ingest(coll, iter_chunks(many, 32, tokenize), embed)
    ranker = Spy(DenseRanker(coll, embed))
    chunks = retrieve(ranker, "shipment crates", 200, lambda t: len(tokenize(t)),
                      chunk_tokens=32, min_block=min_block_tokens(coll))
    assert chunks and max(ranker.asked) < coll.count() == 120
    assert ranker.asked == [first_page(200, 32)]  # one page filled the budget


class Listed:
    """A fixed ranking (to test the budget rule alone)."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self.asked: list[int] = []

    def top(self, question: str, k: int) -> list[Chunk]:
        self.asked.append(k)
        return self.chunks[:k]


def _chunk(i: int, tokens: int) -> Chunk:
    return Chunk(f"d{i}", i + 1, f"T{i}", 0, "word " * tokens, 1.0 - i / 1000, tokens)


def test_a_next_page_is_asked_for_only_while_the_budget_is_not_filled() -> None:
    # every chunk but the last two overflows: pages double until the two that fit
    big = [_chunk(i, 500) for i in range(30)]
    ranking = Listed(big[:1] + [_chunk(1, 50)] + big[2:25] + [_chunk(25, 40)])
    words = lambda text: len(text.split())  # noqa: E731
    chunks = retrieve(ranking, "q", 100, words, chunk_tokens=100, min_block=10)
    assert [c.doc_id for c in chunks] == ["d1"]  # d25 lies past k0 = 10 skipped chunks
    assert ranking.asked == [first_page(100, 100)] * 1 + [2 * first_page(100, 100)]


def test_the_exact_count_drops_the_lowest_ranked_chunk_that_merges_over() -> None:
    chunks = [_chunk(0, 40), _chunk(1, 40)]
    understated = [replace(c, block_tokens=30) for c in chunks]
    words = lambda text: len(text.split())  # noqa: E731
    kept = retrieve(Listed(understated), "q", 70, words, chunk_tokens=32)
    assert [c.doc_id for c in kept] == ["d0"]


def test_document_order(collection, embed, tokenize) -> None:
    chunks = retrieve(DenseRanker(collection, embed), "tortoise", 200,
                      lambda t: len(tokenize(t)), order="document", chunk_tokens=32)
    keys = [(c.doc_number, c.position) for c in chunks]
    assert keys == sorted(keys) and len(keys) > 2


def test_unreachable_server_names_the_url() -> None:
    with pytest.raises(ChromaUnavailableError, match="http://127.0.0.1:9 "):
        open_client(url="http://127.0.0.1:9")
