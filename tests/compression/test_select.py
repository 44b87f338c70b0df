from unittest.mock import patch

import pytest
import torch

from kvrag.compression import kept_positions, layer_budgets, parse_spec, select_kept
from kvrag.compression.knorm import KNorm
from kvrag.compression.pyramidkv import PyramidKV
from kvrag.compression.snapkv import SnapKV


def test_keeps_everything_outside_the_span_and_top_scores_inside() -> None:
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9, 0.2, 7.0],
                           [9.0, 0.8, 0.1, 0.3, 0.2, 0.9, 7.0]])
    kept = select_kept(scores, span=(1, 6), keep=2)
    assert kept.tolist() == [[0, 2, 4, 6], [0, 1, 5, 6]]


def test_ties_go_to_the_earlier_token() -> None:
    kept = select_kept(torch.zeros(1, 6), span=(0, 6), keep=3)
    assert kept.tolist() == [[0, 1, 2]]


def test_keep_all_and_keep_none() -> None:
    scores = torch.rand(2, 10)
    assert select_kept(scores, (2, 8), 6).tolist() == [list(range(10))] * 2
    assert select_kept(scores, (2, 8), 0).tolist() == [[0, 1, 8, 9]] * 2
    with pytest.raises(ValueError, match="outside 0..6"):
        select_kept(scores, (2, 8), 7)


def test_layer_budgets_checked() -> None:
    assert layer_budgets(SnapKV(), 7, 3, 10) == [7, 7, 7]
    assert sum(layer_budgets(PyramidKV(), 7, 3, 10)) == 21


def _kept_layer(spec: str, scores: torch.Tensor, span: tuple[int, int], **kw) -> torch.Tensor:
    """What ``kept_positions`` keeps in one layer whose method scores ``scores``."""
    keys = torch.zeros(scores.shape[0], scores.shape[1], 4)
    queries = torch.zeros(scores.shape[0], 1, 4)
    with patch.object(KNorm, "score", lambda self, inp: scores):
        return kept_positions(parse_spec(spec), [keys], [queries], span, **kw)[0]


@pytest.mark.parametrize(("n", "span", "chunk", "ratio"),
                         [(300, (10, 290), 16, 0.5), (300, (0, 300), 7, 0.3),
                          (101, (1, 100), 16, 0.9), (64, (4, 60), 1, 0.5)])
def test_chunks_are_kept_whole_and_the_budget_exactly(n, span, chunk, ratio) -> None:
    scores = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    spec = f"knorm[chunk={chunk}]:{ratio}"
    kept = _kept_layer(spec, scores, span)
    keep = parse_spec(spec).kept(span[1] - span[0])
    chunks = [list(range(s, min(s + chunk, span[1]))) for s in range(span[0], span[1], chunk)]
    for head in kept.tolist():
        inside = [p for p in head if span[0] <= p < span[1]]
        assert len(inside) == keep
        assert set(range(span[0])) | set(range(span[1], n)) <= set(head)
        partial = [c for c in chunks if 0 < len(set(c) & set(inside)) < len(c)]
        assert len(partial) <= 1  # whole chunks, and one cut short for the remainder
        whole = [c for c in chunks if set(c) <= set(inside)]
        # the whole chunks are the best by mean score
        means = sorted((scores[kept.tolist().index(head), c].mean().item() for c in chunks),
                       reverse=True)
        assert sorted(scores[kept.tolist().index(head), c].mean().item()
                      for c in whole) == sorted(means[:len(whole)])


def test_chunks_win_by_their_total_not_their_best_token() -> None:
    scores = torch.zeros(1, 12)
    scores[0, 0] = 10.0  # one spike in chunk 0
    scores[0, 4:8] = 3.0  # chunk 1 scores more in all
    assert _kept_layer("knorm[chunk=4]:0.6667", scores, (0, 12)).tolist() == [[4, 5, 6, 7]]
    assert _kept_layer("knorm:0.6667", scores, (0, 12)).tolist() == [[0, 4, 5, 6]]


def test_a_short_last_chunk_ranks_by_its_mean_not_its_total() -> None:
    scores = torch.zeros(1, 10)
    scores[0, 0:4] = 1.0  # chunk 0: total 4, mean 1
    scores[0, 8:10] = 1.5  # the short last chunk: total 3, mean 1.5
    assert _kept_layer("knorm[chunk=4]@2", scores, (0, 10)).tolist() == [[8, 9]]


def test_sentence_chunks_follow_the_sentence_ends() -> None:
    scores = torch.zeros(1, 10)
    scores[0, 6] = 5.0
    ends = torch.zeros(10, dtype=torch.bool)
    ends[[2, 5, 8]] = True  # sentences 0-2, 3-5, 6-8, 9
    kept = _kept_layer("knorm[chunk=sentence]:0.7", scores, (0, 10), sentence_ends=ends)
    assert kept.tolist() == [[6, 7, 8]]
    with pytest.raises(ValueError, match="sentence ends"):
        _kept_layer("knorm[chunk=sentence]:0.7", scores, (0, 10))


def test_shared_heads_keep_one_set_from_the_mean_score() -> None:
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    per_head = _kept_layer("knorm:0.5", scores, (5, 45))
    assert len({tuple(h) for h in per_head.tolist()}) == 4
    shared = _kept_layer("knorm[heads=shared]:0.5", scores, (5, 45))
    assert len({tuple(h) for h in shared.tolist()}) == 1
    assert shared[0].tolist() == select_kept(scores.mean(0, keepdim=True), (5, 45), 20)[0].tolist()
    both = _kept_layer("knorm[heads=shared;chunk=5]:0.5", scores, (5, 45))
    assert len({tuple(h) for h in both.tolist()}) == 1


def test_ranked_heads_keep_the_layer_total_by_rank_across_heads():
    from kvrag.compression.select import PAD, kept_counts, select_ranked

    scores = torch.tensor([[9.0, 0.1, 0.2, 0.3, 8.0, 9.0],
                           [9.0, 5.0, 6.0, 7.0, 0.5, 9.0]])
    kept = select_ranked(scores, (1, 5), keep=2)  # 4 of the 8 (head, token) pairs
    assert kept_counts(kept).tolist() == [3, 5]  # head 0: its 8.0; head 1: 5, 6, 7
    assert kept.tolist() == [[0, 4, 5, PAD, PAD], [0, 1, 2, 3, 5]]
    # ties go to the lower head, then the earlier token
    even = select_ranked(torch.ones(2, 6), (1, 5), keep=1)
    assert even.tolist() == [[0, 1, 2, 5], [0, 5, PAD, PAD]]


def test_ranked_heads_with_chunks_take_whole_chunks_of_one_head():
    from kvrag.compression.select import kept_counts, select_ranked

    scores = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 2.0, 2.0, 0.0]])
    kept = select_ranked(scores, (0, 6), keep=2, starts=torch.tensor([0, 2, 4]))
    # (head, chunk) means: h1's chunks 1 and 2 (1.0 each) beat h0's chunks 0 and 1 (0.5)
    assert kept_counts(kept).tolist() == [0, 4]
    assert kept[1].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("text", ["snapkv[heads=ranked]:0.5", "snapkv[heads=ranked;chunk=4]:0.5"])
def test_kept_positions_rank_heads_with_the_same_total_per_layer(text):
    from kvrag.compression.select import kept_counts

    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(2, 40, 8, generator=gen) for _ in range(3)]
    queries = [torch.randn(4, 8, 8, generator=gen) for _ in range(3)]
    kept = kept_positions(parse_spec(text), keys, queries, (4, 36))
    for idx in kept:
        assert int(kept_counts(idx).sum()) == 2 * (8 + 16)  # both heads' outside + keep each
