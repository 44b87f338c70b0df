import pytest
import torch

from kvrag.compression import layer_budgets, select_kept
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
