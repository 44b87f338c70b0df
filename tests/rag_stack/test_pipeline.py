import pytest

from kvrag.data.schema import Doc, Instance
from kvrag.rag_stack import pipeline as pipeline_module
from kvrag.rag_stack.collection import RagIndexError
from kvrag.rag_stack.pipeline import RagConfig, RagPipeline

CORPUS = tuple(Doc(f"p{i}", f"Passage {i}", f"Passage {i} tells of harbour {i} and its "
                   "lighthouse keeper.") for i in range(20)) + (
    Doc("gold", "Orrin Vale", "Orrin Vale's lighthouse has a green lamp."),)


def _question(qid: str) -> Instance:
    return Instance(qid, "What colour is the lamp of Orrin Vale's lighthouse?", ["green"],
                    list(CORPUS), ["gold"])


@pytest.fixture()
def config(tmp_path):
    return RagConfig(index_dir=tmp_path / "index", chunk_tokens=32)


def test_a_shared_corpus_is_ingested_once_and_trusted_once_complete(
        client, embed, tokenize, config, monkeypatch) -> None:
    ingests: list[str] = []
    real = pipeline_module.ingest

    def counted(collection, *args, **kwargs):
        ingests.append(collection.name)
        return real(collection, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "ingest", counted)
    first = RagPipeline(client, embed, config)
    contexts = [first.context(_question(f"q{i}"), 64, tokenize, CORPUS, "hybrid")
                for i in range(3)]
    assert len(ingests) == 1
    assert all(c.doc_recall == 1.0 for c in contexts)
    assert contexts[0].docs[0][1].id == "gold" and contexts[0].docs[0][0] == 21
    # a later run over the same corpus finds the finished ingest and does not check it again
    later = RagPipeline(client, embed, config)
    assert later.context(_question("q9"), 64, tokenize, CORPUS).doc_recall == 1.0
    assert len(ingests) == 1


def test_querying_a_corpus_never_ingested_says_what_to_do(client, embed, tokenize,
                                                          config) -> None:
    with pytest.raises(RagIndexError, match="no corpus 'nowhere'.*kvrag rag ingest"):
        RagPipeline(client, embed, config).query("nowhere", "q", 64, tokenize)


def test_an_unknown_retriever_is_refused_with_the_known_ones(client, embed, tokenize,
                                                             config) -> None:
    pipe = RagPipeline(client, embed, config)
    pipe.ingest("named", CORPUS, tokenize)
    with pytest.raises(ValueError, match="dense, bm25, hybrid"):
        pipe.query("named", "q", 64, tokenize, "colbert")
