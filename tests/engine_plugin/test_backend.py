"""The backend's decode attention over slot runs, against SDPA over gathered slots."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from kvrag.engine_plugin import backend
from kvrag.engine_plugin.compaction import Compacted


@pytest.mark.parametrize("slots,expected", [
    ([5, 6, 7, 20, 21, 3], [(5, 3), (20, 2), (3, 1)]),
    ([9], [(9, 1)]),
    ([], []),
])
def test_runs_of_consecutive_slots(slots, expected):
    assert backend._runs(torch.tensor(slots, dtype=torch.long)) == expected


def test_too_fragmented_slots_are_gathered_instead():
    scattered = torch.arange(0, 2 * (backend.MAX_RUNS + 1), 2)
    assert backend._runs(scattered) is None


def _reference(q, kbuf, vbuf, slots, scale):
    keys, values = kbuf[slots].transpose(0, 1), vbuf[slots].transpose(0, 1)
    return scaled_dot_product_attention(q[:, None], keys, values, scale=scale,
                                        enable_gqa=True)[:, 0]


@pytest.mark.parametrize("compacted", [False, True])
@pytest.mark.parametrize("fragmented", [False, True])
def test_decode_plan_attends_to_exactly_the_right_slots(compacted, fragmented):
    torch.manual_seed(0)
    kbuf, vbuf = torch.randn(300, 2, 8), torch.randn(300, 2, 8)
    row = torch.arange(300)
    if fragmented:
        row = torch.randperm(300)
    q = torch.randn(4, 8)
    if compacted:
        comp = Compacted("r", 100, 0, row[200:240].clone(), [40, 25], [torch.zeros(2, 1)] * 2)
        plan = backend._DecodePlan.of(row, 110, comp)
        expected_slots = [torch.cat([row[200:240][:keep], row[100:110]]) for keep in (40, 25)]
    else:
        plan = backend._DecodePlan.of(row, 110, None)
        expected_slots = [row[:110]] * 2
    for layer in range(2):
        pieces = plan.pieces(layer)
        got = backend._attend(q, [kbuf[p] for p in pieces], [vbuf[p] for p in pieces], 0.3)
        want = _reference(q, kbuf, vbuf, expected_slots[layer], 0.3)
        assert torch.allclose(got, want, atol=1e-5)
    assert all(isinstance(p, slice) for p in plan.pieces(0)) == (not fragmented)
