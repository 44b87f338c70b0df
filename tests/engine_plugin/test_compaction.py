"""Compaction bookkeeping on plain tensors shaped like SGLang's pool.

The real pool and allocator are exercised end to end in test_sglang_engine.py; here the
copy and the slot arithmetic are checked element by element.
"""

from __future__ import annotations

import pytest
import torch

from kvrag.compression import parse_spec
from kvrag.engine_plugin.compaction import Compacted, compact, kept_positions
from kvrag.engine_plugin.rows import release_ranges


def _compacted(n=100, protected=20, kmax=40) -> Compacted:
    return Compacted("r", n, protected, torch.arange(kmax), [kmax], [torch.zeros(1, kmax)])


@pytest.mark.parametrize("ranges,expected", [
    ([(20, 130)], [(100, 130)]),  # the usual release: prompt part replaced, decode kept
    ([(20, 100)], []),  # released before any decode token
    ([(130, 140)], [(130, 140)]),  # over-allocated tail passes through
    ([(20, 110), (120, 125)], [(100, 110), (120, 125)]),
])
def test_release_skips_the_compacted_prompt(ranges, expected):
    assert release_ranges(_compacted(), ranges) == expected


def test_release_never_touches_tree_owned_positions():
    with pytest.raises(AssertionError, match="tree-owned"):
        release_ranges(_compacted(), [(10, 130)])


class _Pool:
    """Two layers of [slots, kv_heads, d] buffers, as SGLang's MHA pool exposes them."""

    def __init__(self, slots: int, kv_heads: int, d: int) -> None:
        torch.manual_seed(0)
        self.k = [torch.randn(slots, kv_heads, d) for _ in range(2)]
        self.v = [torch.randn(slots, kv_heads, d) for _ in range(2)]

    def get_key_buffer(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def get_value_buffer(self, layer: int) -> torch.Tensor:
        return self.v[layer]


class _Allocator:
    def __init__(self, free: list[int]) -> None:
        self.free_slots = list(free)

    def alloc(self, n: int):
        if n > len(self.free_slots):
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return torch.tensor(out)

    def free(self, slots: torch.Tensor) -> None:
        self.free_slots += slots.tolist()


@pytest.mark.parametrize("protected", [0, 30])
def test_compact_copies_each_heads_kept_tokens_and_frees_the_rest(protected):
    n, kv_heads, d = 40, 2, 8
    pool = _Pool(200, kv_heads, d)
    row = torch.randperm(100)[:n] + 50  # scattered slots, as an allocator hands them out
    before = [(k.clone(), v.clone()) for k, v in zip(pool.k, pool.v, strict=True)]
    queries = [torch.randn(8, 4, d) for _ in range(2)]
    allocator = _Allocator(list(range(20)))
    spec = parse_spec("snapkv:0.5")
    done = compact(pool, allocator, row, rid="r", n=n, protected=protected, layer_ids=[0, 1],
                   queries=queries, spec=spec, span=(4, 36))
    assert done is not None
    comp = done.compacted
    kept = kept_positions(spec, [before[i][0][row].transpose(0, 1) for i in range(2)],
                          [q.transpose(0, 1) for q in queries], (4, 36))
    assert [k.tolist() for k in comp.kept] == [k.tolist() for k in kept]
    kmax = max(comp.keep)
    assert comp.keep == [16 + 8, 16 + 8]  # half of 32 evictable plus 8 outside the span
    own = n - protected
    assert done.freed == max(0, own - kmax) and done.allocated == max(0, kmax - own)
    for layer in range(2):
        for head in range(kv_heads):
            src = row[comp.kept[layer][head]]
            got_k = pool.k[layer][comp.slots[:kmax], head]
            assert torch.equal(got_k, before[layer][0][src, head])
            assert torch.equal(pool.v[layer][comp.slots[:kmax], head], before[layer][1][src, head])
    # tree-owned slots are never written
    for layer in range(2):
        shared = row[:protected]
        assert torch.equal(pool.k[layer][shared], before[layer][0][shared])


def test_compact_gives_up_cleanly_when_no_slots_can_be_allocated():
    pool = _Pool(200, 2, 8)
    row = torch.arange(50, 90)
    before = pool.k[0].clone()
    allocator = _Allocator([])
    done = compact(pool, allocator, row, rid="r", n=40, protected=30, layer_ids=[0, 1],
                   queries=[torch.randn(8, 4, 8)] * 2, spec=parse_spec("snapkv:0.5"),
                   span=(4, 36))
    assert done is None and torch.equal(pool.k[0], before) and allocator.free_slots == []
