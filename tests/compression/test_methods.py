"""Every method against scores computed by hand (plain loops) on small random tensors.

Shapes use GQA: 4 query heads share 2 KV heads (group of 2).
"""

import math

import pytest
import torch

from kvrag.compression import METHODS, ScoringInput
from kvrag.compression.h2o import H2O
from kvrag.compression.knorm import KNorm
from kvrag.compression.pyramidkv import PyramidKV
from kvrag.compression.random_press import RandomScores
from kvrag.compression.retrieval import RetrievalAttention
from kvrag.compression.snapkv import SnapKV
from kvrag.compression.streamingllm import StreamingLLM
from kvrag.compression.tova import TOVA

N, D, KV_HEADS, Q_HEADS = 12, 8, 2, 4


@pytest.fixture()
def inp() -> ScoringInput:
    gen = torch.Generator().manual_seed(0)
    return ScoringInput(keys=torch.randn(KV_HEADS, N, D, generator=gen),
                        queries=torch.randn(Q_HEADS, N, D, generator=gen), layer=1, n_layers=3)


def attention_row(inp: ScoringInput, q_head: int, pos: int) -> list[float]:
    """Causal softmax of one query over all keys, by hand."""
    kv = q_head // (Q_HEADS // KV_HEADS)
    logits = [float(inp.queries[q_head, pos] @ inp.keys[kv, j]) / math.sqrt(D)
              if j <= pos else -math.inf for j in range(N)]
    top = max(logits)
    exps = [math.exp(x - top) if x > -math.inf else 0.0 for x in logits]
    return [e / sum(exps) for e in exps]


def group_average(per_q_head: list[list[float]]) -> list[list[float]]:
    g = Q_HEADS // KV_HEADS
    return [[sum(per_q_head[h * g + i][j] for i in range(g)) / g for j in range(N)]
            for h in range(KV_HEADS)]


def test_registry_holds_every_method() -> None:
    assert set(METHODS) == {"snapkv", "pyramidkv", "streamingllm", "h2o", "knorm", "tova",
                            "random", "retrieval", "kvzip"}


@pytest.mark.parametrize("norm", ["local", "prefix"])
def test_kvzip_scores_a_pass_by_its_most_attention(inp, monkeypatch, norm) -> None:
    """By hand: repeat query j of a pass over positions [5, 9) sees the prompt's 2 sink keys
    and the chunk's keys (``local``) or every prompt key (``prefix``), and the pass's keys
    0..j; a chunk key's score is its largest softmax weight over the pass, then over its
    GQA group."""
    import kvrag.compression.kvzip as kvzip

    monkeypatch.setattr(kvzip, "BLOCK_ELEMENTS", 40)  # several row blocks, as on long prompts
    gen = torch.Generator().manual_seed(1)
    r, (a, b), sinks = 5, (5, 9), 2
    rq, rk = torch.randn(Q_HEADS, r, D, generator=gen), torch.randn(KV_HEADS, r, D, generator=gen)
    seen = list(range(sinks)) + list(range(a, b)) if norm == "local" else list(range(N))
    g = Q_HEADS // KV_HEADS
    expected = [[0.0] * (b - a) for _ in range(KV_HEADS)]
    for h in range(Q_HEADS):
        kv = h // g
        for j in range(r):
            logits = {t: float(rq[h, j] @ inp.keys[kv, t]) / math.sqrt(D) for t in seen}
            own = [float(rq[h, j] @ rk[kv, t]) / math.sqrt(D) for t in range(j + 1)]
            total = sum(math.exp(x) for x in [*logits.values(), *own])
            for t in range(a, b):
                expected[kv][t - a] = max(expected[kv][t - a], math.exp(logits[t]) / total)
    method = kvzip.KVzip(norm=norm, sinks=sinks)
    rep = kvzip.RepeatPass(a, b, tuple(range(r)))
    got = method.pass_scores(inp.keys, rep, kvzip.PassAttention(rq, rk))
    torch.testing.assert_close(got, torch.tensor(expected))
    # the sinks always win; the engine hands the passes' scores in
    scores = kvzip.ReconstructionScores(method, N)
    scores.add(1, inp.keys, rep, kvzip.PassAttention(rq, rk))
    with_passes = ScoringInput(inp.keys, inp.queries, 1, 3, reconstruction=scores.by_layer[1])
    final = method.score(with_passes)
    assert torch.isinf(final[:, :sinks]).all() and (final[:, sinks:a] == 0).all()
    torch.testing.assert_close(final[:, a:b], got)
    with pytest.raises(ValueError, match="reconstruction pass"):
        method.score(inp)


def test_kvzip_passes_repeat_the_documents_in_chunks_in_the_chat_turn() -> None:
    import kvrag.compression.kvzip as kvzip

    tokens = kvzip.RepeatTokens(instruction=(900,), continuation=(901,), suffix=(902, 903))
    ids = list(range(100, 130))
    passes = kvzip.KVzip(pass_tokens=8).passes(ids, (4, 24), tokens)
    assert [(p.start, p.end) for p in passes] == [(4, 12), (12, 20), (20, 24)]
    assert passes[0].ids == (900, 902, 903, *range(104, 112))
    # a later pass continues from the previous chunk's last tokens
    assert passes[1].ids == (901, *range(104, 112), 902, 903, *range(112, 120))
    one = kvzip.KVzip(pass_tokens=0).passes(ids, (4, 24), tokens)
    assert [(p.start, p.end) for p in one] == [(4, 24)]


def test_kvzip_turn_suffix_closes_the_user_turn(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from kvrag.compression.kvzip import turn_suffix

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    suffix = turn_suffix(tokenizer)
    assert "<|im_end|>" in suffix and suffix.rstrip().endswith("assistant")


def test_snapkv(inp: ScoringInput) -> None:
    window, kernel = 4, 5
    per_head = []
    for h in range(Q_HEADS):
        rows = [attention_row(inp, h, p) for p in range(N - window, N)]
        per_head.append([sum(r[j] for r in rows) / window for j in range(N)])
    grouped = group_average(per_head)
    before = N - window  # only the tokens before the window are pooled (zero padding)
    expected = [[sum(row[t] for t in range(j - 2, j + 3) if 0 <= t < before) / kernel
                 for j in range(N)] for row in grouped]
    got = SnapKV(window=window, kernel=kernel).score(inp)
    assert torch.isinf(got[:, N - window:]).all()
    torch.testing.assert_close(got[:, : N - window],
                               torch.tensor(expected)[:, : N - window])


def test_snapkv_rejects_even_kernel() -> None:
    with pytest.raises(ValueError, match="odd kernel"):
        SnapKV(kernel=4)


def test_pyramidkv_scores_like_snapkv_with_sloped_budgets(inp: ScoringInput) -> None:
    torch.testing.assert_close(PyramidKV(window=4).score(inp), SnapKV(window=4).score(inp))
    budgets = PyramidKV().layer_budgets(keep=100, n_layers=5, n_evictable=1000)
    assert sum(budgets) == 500
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 100 > budgets[-1]
    assert budgets[-1] == 5  # keep / beta
    capped = PyramidKV().layer_budgets(keep=80, n_layers=4, n_evictable=100)
    assert sum(capped) == 320 and max(capped) == 100


def test_streamingllm(inp: ScoringInput) -> None:
    got = StreamingLLM().score(inp)
    assert torch.isinf(got[:, :4]).all()
    assert got[0, 4:].tolist() == list(range(4, N)) == got[1, 4:].tolist()


def test_queries_needed() -> None:
    assert SnapKV(window=16).queries_needed() == 16 and TOVA().queries_needed() == 1
    assert H2O().queries_needed() is None and KNorm().queries_needed() == 0


def test_h2o_refuses_partial_queries(inp: ScoringInput) -> None:
    partial = ScoringInput(inp.keys, inp.queries[:, -3:], inp.layer, inp.n_layers)
    with pytest.raises(ValueError, match="every prompt query"):
        H2O().score(partial)
    SnapKV(window=3).score(partial)  # three queries are all SnapKV needs here


def test_h2o(inp: ScoringInput) -> None:
    per_head = [[sum(attention_row(inp, h, p)[j] for p in range(N)) for j in range(N)]
                for h in range(Q_HEADS)]
    torch.testing.assert_close(H2O(query_block=5).score(inp), torch.tensor(group_average(per_head)))


def test_knorm(inp: ScoringInput) -> None:
    expected = [[-math.sqrt(sum(float(x) ** 2 for x in inp.keys[h, j])) for j in range(N)]
                for h in range(KV_HEADS)]
    torch.testing.assert_close(KNorm().score(inp), torch.tensor(expected))


def test_tova(inp: ScoringInput) -> None:
    rows = [attention_row(inp, h, N - 1) for h in range(Q_HEADS)]
    mean = [sum(r[j] for r in rows) / Q_HEADS for j in range(N)]
    torch.testing.assert_close(TOVA().score(inp), torch.tensor([mean, mean]))


def test_random_is_seeded_per_layer(inp: ScoringInput) -> None:
    a, b = RandomScores(seed=1).score(inp), RandomScores(seed=1).score(inp)
    assert torch.equal(a, b) and a.shape == (KV_HEADS, N)
    other_layer = ScoringInput(inp.keys, inp.queries, layer=2, n_layers=3)
    assert not torch.equal(a, RandomScores(seed=1).score(other_layer))
    assert not torch.equal(a, RandomScores(seed=2).score(inp))


def test_retrieval_mask_keeps_top_k_document_keys_per_query_head(inp: ScoringInput) -> None:
    query = inp.queries[:, -1]  # [q_heads, d]
    span, k = (3, 9), 2
    mask = RetrievalAttention.decode_mask(query, inp.keys, span, k)
    for h in range(Q_HEADS):
        kv = h // 2
        dots = {j: float(query[h] @ inp.keys[kv, j]) for j in range(*span)}
        top = sorted(dots, key=dots.get, reverse=True)[:k]
        expected = [j < span[0] or j >= span[1] or j in top for j in range(N)]
        assert mask[h].tolist() == expected


def test_kvzip_scores_a_pass_run_in_pieces_as_in_one(inp) -> None:
    """A server may prefill a pass in chunks: the pieces' scores, accumulated, are the
    whole pass's."""
    import kvrag.compression.kvzip as kvzip

    gen = torch.Generator().manual_seed(2)
    r = 7
    rq, rk = torch.randn(Q_HEADS, r, D, generator=gen), torch.randn(KV_HEADS, r, D, generator=gen)
    method, rep = kvzip.KVzip(sinks=2), kvzip.RepeatPass(4, 10, tuple(range(r)))
    whole = kvzip.ReconstructionScores(method, N)
    whole.add(0, inp.keys, rep, kvzip.PassAttention(rq, rk))
    pieces = kvzip.ReconstructionScores(method, N)
    for a, b in ((0, 3), (3, 4), (4, 7)):
        pieces.add(0, inp.keys, rep, kvzip.PassAttention(rq[:, a:b], rk[:, :b], offset=a))
    torch.testing.assert_close(pieces.by_layer[0], whole.by_layer[0])
