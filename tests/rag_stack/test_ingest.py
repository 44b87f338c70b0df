import uuid

import pytest

from kvrag.data.prompt import format_doc
from kvrag.data.schema import Doc
from kvrag.rag_stack.collection import (
    RagIndexError,
    create_collection,
    is_complete,
    min_block_tokens,
    revision,
)
from kvrag.rag_stack.ingest import chunk_docs, ingest, iter_chunks

DOCS = [
    Doc("alpha", "Alpha", " ".join(f"Alpha sentence number {i} talks about lighthouses."
                                   for i in range(40))),
    Doc("beta", "Beta", "Beta is short. It mentions the violet harbour crane."),
]
MANY = [Doc(f"d{i}", f"Doc {i}", f"Document {i} describes harbour number {i} in a few "
            "words. It has a second sentence about its cranes.") for i in range(30)]


def new_collection(client):
    return create_collection(client, f"test-{uuid.uuid4().hex}", "test")


def test_chunks_keep_doc_ids_size_and_block_tokens(tokenize) -> None:
    nodes = chunk_docs(DOCS, 64, tokenize)
    assert {n.metadata["source_id"] for n in nodes} == {"alpha", "beta"}
    alpha = [n for n in nodes if n.metadata["source_id"] == "alpha"]
    assert len(alpha) > 3 and all(n.metadata["doc_number"] == 1 for n in alpha)
    assert [n.metadata["position"] for n in alpha] == list(range(len(alpha)))
    assert all(len(tokenize(n.text)) <= 64 for n in nodes)
    for n in nodes:  # the count a budget adds is the block's own
        block = format_doc(n.metadata["doc_number"], Doc(n.metadata["source_id"],
                                                         n.metadata["title"], n.text))
        assert n.metadata["block_tokens"] == len(tokenize("\n\n" + block)) - len(tokenize("\n\n"))
    assert chunk_docs(DOCS, 64, tokenize)[0].node_id == nodes[0].node_id  # content ids
    assert [len(doc) for doc in iter_chunks(DOCS, 64, tokenize)] == [len(alpha), 1]


def test_reingest_adds_nothing(client, embed, tokenize) -> None:
    collection = new_collection(client)
    nodes = chunk_docs(DOCS, 64, tokenize)
    first = ingest(collection, iter_chunks(DOCS, 64, tokenize), embed)
    assert first.added == len(nodes) == collection.count()
    again = ingest(collection, iter_chunks(DOCS, 64, tokenize), embed)
    assert (again.added, again.removed, again.unchanged) == (0, 0, len(nodes))
    assert collection.count() == len(nodes)
    assert min_block_tokens(collection) == min(n.metadata["block_tokens"] for n in nodes)


def test_changed_doc_replaces_its_chunks(client, embed, tokenize) -> None:
    collection = new_collection(client)
    ingest(collection, iter_chunks(DOCS, 64, tokenize), embed)
    before = revision(collection)
    changed = [DOCS[0], Doc("beta", "Beta", "Beta now describes a copper bell tower.")]
    stats = ingest(collection, iter_chunks(changed, 64, tokenize), embed)
    assert stats.added == 1 and stats.removed == 1
    beta = collection.get(where={"source_id": "beta"}, include=["documents"])
    assert beta["documents"] == ["Beta now describes a copper bell tower."]
    assert revision(collection) > before  # indexes built on the old chunks are stale


class Killed(Exception):
    pass


def test_killed_ingest_resumes_without_redoing_written_batches(client, embed, tokenize) -> None:
    collection = new_collection(client)
    written: list[int] = []

    def kill_after_two(chunks: int, docs: int) -> None:
        written.append(chunks)
        if len(written) == 2:
            raise Killed

    with pytest.raises(Killed):
        ingest(collection, iter_chunks(MANY, 64, tokenize), embed, embed_batch=4,
               on_batch=kill_after_two, complete="all")
    assert collection.count() == sum(written) < len(MANY)
    assert not is_complete(collection, "all")
    embedded: list[int] = []
    real = embed.get_text_embedding_batch
    embed_calls = lambda texts, **kw: embedded.append(len(texts)) or real(texts, **kw)  # noqa: E731
    object.__setattr__(embed, "get_text_embedding_batch", embed_calls)
    try:
        stats = ingest(collection, iter_chunks(MANY, 64, tokenize), embed, embed_batch=4,
                       complete="all")
    finally:
        object.__delattr__(embed, "get_text_embedding_batch")
    assert stats.added == len(MANY) - sum(written) == sum(embedded)
    assert stats.unchanged == sum(written)
    assert collection.count() == len(MANY) and is_complete(collection, "all")


def test_present_ids_are_read_a_batch_of_docs_at_a_time(client, embed, tokenize) -> None:
    collection = new_collection(client)
    asked: list[int] = []
    real_get = collection.get

    def get(*args, where=None, **kwargs):
        if where is not None:
            asked.append(len(where["source_id"]["$in"]))
        return real_get(*args, where=where, **kwargs)

    object.__setattr__(collection, "get", get)
    ingest(collection, iter_chunks(MANY, 64, tokenize), embed, embed_batch=4)
    assert len(asked) == len(MANY) // 4 + 1 and max(asked) == 4


def test_a_collection_kvrag_did_not_write_is_named_with_what_to_do(client) -> None:
    name = f"test-{uuid.uuid4().hex}"
    client.create_collection(name)
    with pytest.raises(RagIndexError, match=f"collection {name} .*not written by this "
                                            "version of kvrag.*ingest again"):
        create_collection(client, name, "test")
