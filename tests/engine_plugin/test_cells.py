"""Cells: per-head kept sets packed into slots, and attention over cell lists."""

import torch

from kvrag.engine_plugin.cells import CellLayout, CellRead, attend, cell_targets, stack


def test_a_layout_reads_back_the_cells_packing_wrote():
    counts = torch.tensor([[1, 6, 2], [3, 3, 3]])  # 2 layers, 9 entries: 3 slots of 3 cells
    slots = torch.tensor([40, 7, 12])
    cells, valid = CellLayout(counts, 3).cells(slots)
    for layer in range(2):
        targets = cell_targets(counts[layer], slots).tolist()
        assert sorted(targets) == sorted(s * 3 + c for s in slots.tolist() for c in range(3))
        read = [cells[layer, h, :int(counts[layer, h])].tolist() for h in range(3)]
        assert sum(read, []) == targets  # head by head, in the order packing wrote them
        assert valid[layer].sum(dim=1).tolist() == counts[layer].tolist()


def test_attention_over_cells_is_attention_over_each_heads_own_keys():
    gen = torch.Generator().manual_seed(0)
    kv_heads, group, d, n_slots = 2, 2, 4, 16
    kbuf = torch.randn(n_slots, kv_heads, d, generator=gen)
    vbuf = torch.randn(n_slots, kv_heads, d, generator=gen)
    layout = CellLayout(torch.tensor([[1, 3]]), 2)  # 2 packed slots; then 2 later tokens
    row = torch.tensor([5, 9, 3, 11])
    read = CellRead.of(row, 4, layout, layers=1, kv_heads=kv_heads)
    index, valid = stack([read])
    q = torch.randn(1, 1, kv_heads * group, d, generator=gen)
    out = attend(q, index[0], valid[0][:, None], kbuf, vbuf, 0.5)
    flat_k, flat_v = kbuf.view(-1, d), vbuf.view(-1, d)
    # head 0 holds cell 0 (slot 5 column 0); head 1 cells 1..3 (slot 5 col 1, slot 9 cols 0-1)
    own = {0: [5 * 2 + 0], 1: [5 * 2 + 1, 9 * 2 + 0, 9 * 2 + 1]}
    for qh in range(kv_heads * group):
        h = qh // group
        cells = own[h] + [3 * 2 + h, 11 * 2 + h]
        w = (flat_k[cells] @ q[0, 0, qh] * 0.5).softmax(0)
        torch.testing.assert_close(out[0, 0, qh], w @ flat_v[cells])


def test_bfloat16_buffers_attend_in_float32_and_return_bfloat16():
    gen = torch.Generator().manual_seed(1)
    kbuf = torch.randn(8, 2, 16, generator=gen)
    vbuf = torch.randn(8, 2, 16, generator=gen)
    q = torch.randn(1, 3, 4, 16, generator=gen)
    read = CellRead.of(torch.tensor([1, 4, 6, 2, 7]), 5, CellLayout(torch.tensor([[1, 3]]), 2),
                       layers=1, kv_heads=2)
    index, valid = stack([read])
    causal = torch.ones(3, 2, index.shape[-1], dtype=torch.bool)
    want = attend(q, index[0], causal[None], kbuf, vbuf, 0.25)
    got = attend(q.bfloat16(), index[0], causal[None], kbuf.bfloat16(), vbuf.bfloat16(), 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
