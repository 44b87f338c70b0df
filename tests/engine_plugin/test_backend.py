"""The backend over SGLang's real pools and torch_native backend, one layer call at a time.

A compacted request's decode and extend go through the inner backend over its physical
row; both are checked against SDPA over exactly the slots it should read. The engine tests
(test_sglang_engine.py, test_decode_paths.py) run the same code inside the real engine.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from torch.nn.functional import scaled_dot_product_attention

from kvrag.compression import HeadShard, parse_spec
from kvrag.engine_plugin import backend
from kvrag.engine_plugin.backend import KvragAttnBackend
from kvrag.engine_plugin.capture import QueryCapture, QueryTail
from kvrag.engine_plugin.once import PositionShifts
from kvrag.engine_plugin.reconstruction import Rebuilds
from kvrag.engine_plugin.rows import Rows

KV_HEADS, Q_HEADS, D, LAYERS = 2, 4, 8, 2


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


def _sdpa(q, kbuf, vbuf, slots, scale, causal_from: int | None = None):
    """q [tokens, q_heads, d] over the given slots; causal for queries placed at the end."""
    keys, values = kbuf[slots].transpose(0, 1), vbuf[slots].transpose(0, 1)
    mask = None
    if causal_from is not None:
        qpos = torch.arange(causal_from, causal_from + q.shape[0])[:, None]
        mask = torch.arange(len(slots))[None] <= qpos
    return scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask,
                                        scale=scale, enable_gqa=True).transpose(0, 1)


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("fragmented", [False, True])
def test_decode_plan_attends_to_exactly_the_right_slots(uneven, fragmented):
    torch.manual_seed(0)
    kbuf, vbuf = torch.randn(300, 2, 8), torch.randn(300, 2, 8)
    row = torch.randperm(300) if fragmented else torch.arange(300)
    q = torch.randn(4, 8)
    # a physical row: 40 kept slots (per layer 40 and 25 valid when uneven), 10 decoded
    keep = [40, 25] if uneven else None
    plan = backend._DecodePlan.of(row, 50, keep)
    for layer in range(2):
        count = keep[layer] if uneven else 40
        expected = torch.cat([row[:count], row[40:50]])
        pieces = plan.pieces(layer)
        got = backend._attend(q, [kbuf[p] for p in pieces], [vbuf[p] for p in pieces], 0.3)
        want = _sdpa(q[None], kbuf, vbuf, expected, 0.3)[0]
        assert torch.allclose(got, want, atol=1e-5)
    assert all(isinstance(p, slice) for p in plan.pieces(0)) == (not fragmented)


class _Runner(SimpleNamespace):
    """What the backends read of SGLang's ModelRunner, over its real pools."""


def _runner() -> _Runner:
    pool = MHATokenToKVPool(600, 1, torch.float32, KV_HEADS, D, LAYERS, "cpu", False)
    allocator = TokenToKVPoolAllocator(600, torch.float32, "cpu", pool, need_sort=False)
    rows = ReqToTokenPool(8, 256, "cpu", False)
    return _Runner(device="cpu", req_to_token_pool=rows, token_to_kv_pool=pool,
                   token_to_kv_pool_allocator=allocator, server_args=None)


def _layer(layer_id: int) -> SimpleNamespace:
    return SimpleNamespace(layer_id=layer_id, tp_q_head_num=Q_HEADS, tp_k_head_num=KV_HEADS,
                           qk_head_dim=D, v_head_dim=D, scaling=D ** -0.5,
                           is_cross_attention=False, sliding_window_size=-1,
                           attn_type=AttentionType.DECODER, k_scale=None, v_scale=None)


def _batch(mode, rows, seq_lens, out_cache_loc, prefix=None, extend=None):
    return SimpleNamespace(
        forward_mode=mode, batch_size=len(rows),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64), seq_lens_sum=sum(seq_lens),
        out_cache_loc=out_cache_loc, encoder_lens=None, kv_loc_plan=None,
        extend_prefix_lens=None if prefix is None else torch.tensor(prefix),
        extend_seq_lens=None if extend is None else torch.tensor(extend),
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend)


def _prefilled(runner, kv: KvragAttnBackend, n: int) -> tuple[int, torch.Tensor]:
    """A request of ``n`` prompt tokens with random KV in a new row; (row, its slots)."""
    row = runner.req_to_token_pool.alloc_rows(1)[0]
    slots = runner.token_to_kv_pool_allocator.alloc(n)
    runner.req_to_token_pool.req_to_token[row, :n] = slots.to(torch.int32)
    for lid in range(LAYERS):
        runner.token_to_kv_pool.get_key_buffer(lid)[slots] = torch.randn(n, KV_HEADS, D)
        runner.token_to_kv_pool.get_value_buffer(lid)[slots] = torch.randn(n, KV_HEADS, D)
    tail = kv.queries.tails[row] = QueryTail()
    tail.end = n
    tail.layers = {lid: torch.randn(64, Q_HEADS, D) for lid in range(LAYERS)}
    return row, slots


def _backend(runner, python_decode: bool) -> KvragAttnBackend:
    """The backend over the plugin state's parts, as ``register.create_backend`` wires it."""
    layers = list(range(LAYERS))
    rows = Rows(runner, layers, HeadShard())
    return KvragAttnBackend(runner, TorchNativeAttnBackend(runner), QueryCapture(64, layers),
                            rows, PositionShifts(rows.req_to_token.shape[0], "cpu"),
                            Rebuilds(layers), python_decode=python_decode)


def _compress(kv: KvragAttnBackend, row: int, **kwargs):
    return kv.rows.compress(row, kv.queries.pop(row), **kwargs)


def _kept_slots(kv: KvragAttnBackend, row: int, layer: int) -> torch.Tensor:
    record = kv.rows.resident[row].record
    return record.slots[:record.keep[layer]]


@pytest.mark.parametrize("python_decode", [False, True])
def test_decode_over_a_compacted_and_a_full_request(python_decode):
    torch.manual_seed(1)
    runner = _runner()
    kv = _backend(runner, python_decode=python_decode)
    compacted, _ = _prefilled(runner, kv, 120)
    full, full_slots = _prefilled(runner, kv, 90)
    kv.queries.pop(full)
    assert _compress(kv, compacted, rid="c", protected=0, spec=parse_spec("snapkv:0.5"),
                       span=(0, 100)) is not None
    req_to_token = runner.req_to_token_pool.req_to_token
    decoded = {compacted: [], full: []}
    for step in range(3):
        new = runner.token_to_kv_pool_allocator.alloc(2)
        lens = [120 + step + 1, 90 + step + 1]
        for row, slot, length in zip((compacted, full), new.tolist(), lens, strict=True):
            req_to_token[row, length - 1] = slot  # as SGLang's prepare_for_decode does
            decoded[row].append(slot)
        fb = _batch(ForwardMode.DECODE, [compacted, full], lens, new)
        kv.init_forward_metadata(fb)
        for lid in range(LAYERS):
            q, k, v = torch.randn(2, Q_HEADS * D), torch.randn(2, KV_HEADS, D), torch.randn(
                2, KV_HEADS, D)
            out = kv.forward_decode(q, k, v, _layer(lid), fb).view(2, Q_HEADS, D)
            kbuf = runner.token_to_kv_pool.get_key_buffer(lid)
            vbuf = runner.token_to_kv_pool.get_value_buffer(lid)
            want_c = torch.cat([_kept_slots(kv, compacted, lid), torch.tensor(decoded[compacted])])
            want_f = torch.cat([full_slots, torch.tensor(decoded[full])])
            for i, slots in enumerate((want_c, want_f)):
                want = _sdpa(q.view(2, Q_HEADS, D)[i:i + 1], kbuf, vbuf, slots, D ** -0.5)
                assert torch.allclose(out[i], want[0], atol=1e-5)
    # the physical row lists the kept slots, then the decoded ones
    physical = kv.rows.resident[compacted].row
    kmax = kv.rows.resident[compacted].record.slots.numel()
    assert req_to_token[physical, kmax:kmax + 3].tolist() == decoded[compacted]


def test_ranked_heads_decode_over_their_own_cells_beside_a_full_request():
    """Heads keeping different counts are packed into the prompt's cells; each query head
    must attend to exactly its KV head's kept tokens (as they were before packing), then
    the decoded ones, in a batch with an ordinary request."""
    torch.manual_seed(3)
    runner = _runner()
    kv = _backend(runner, python_decode=True)
    compacted, prompt_slots = _prefilled(runner, kv, 120)
    full, full_slots = _prefilled(runner, kv, 90)
    kv.queries.pop(full)
    before = [(runner.token_to_kv_pool.get_key_buffer(lid)[prompt_slots].clone(),
               runner.token_to_kv_pool.get_value_buffer(lid)[prompt_slots].clone())
              for lid in range(LAYERS)]
    done = _compress(kv, compacted, rid="c", protected=0,
                     spec=parse_spec("snapkv[heads=ranked]:0.5"), span=(0, 100))
    record = done.compacted
    assert record.layout is not None and done.freed == 120 - record.kv_tokens
    assert record.kv_tokens == 20 + 50  # the kept share exactly, whatever each head keeps
    req_to_token = runner.req_to_token_pool.req_to_token
    decoded = {compacted: [], full: []}
    for step in range(2):
        new = runner.token_to_kv_pool_allocator.alloc(2)
        lens = [120 + step + 1, 90 + step + 1]
        for row, slot, length in zip((compacted, full), new.tolist(), lens, strict=True):
            req_to_token[row, length - 1] = slot
            decoded[row].append(slot)
        fb = _batch(ForwardMode.DECODE, [compacted, full], lens, new)
        kv.init_forward_metadata(fb)
        for lid in range(LAYERS):
            q, k, v = torch.randn(2, Q_HEADS * D), torch.randn(2, KV_HEADS, D), torch.randn(
                2, KV_HEADS, D)
            out = kv.forward_decode(q, k, v, _layer(lid), fb).view(2, Q_HEADS, D)
            kbuf = runner.token_to_kv_pool.get_key_buffer(lid)
            vbuf = runner.token_to_kv_pool.get_value_buffer(lid)
            want_f = _sdpa(q.view(2, Q_HEADS, D)[1:], kbuf, vbuf,
                           torch.cat([full_slots, torch.tensor(decoded[full])]), D ** -0.5)
            assert torch.allclose(out[1], want_f[0], atol=1e-5)
            keys, values = before[lid]
            new_slots = torch.tensor(decoded[compacted])
            for qh in range(Q_HEADS):
                h = qh // (Q_HEADS // KV_HEADS)
                kept = [p for p in record.kept[lid][h].tolist() if p >= 0]
                ks = torch.cat([keys[kept, h], kbuf[new_slots, h]])
                vs = torch.cat([values[kept, h], vbuf[new_slots, h]])
                w = (ks @ q.view(2, Q_HEADS, D)[0, qh] * D ** -0.5).softmax(0)
                assert torch.allclose(out[0, qh], w @ vs, atol=1e-5)
    counts = record.layout.counts
    assert (counts.sum(dim=1) == KV_HEADS * 70).all() and len(set(counts[0].tolist())) > 1


def test_an_extend_over_a_compacted_request_reads_its_kept_slots():
    torch.manual_seed(2)
    runner = _runner()
    kv = _backend(runner, python_decode=False)
    row, _ = _prefilled(runner, kv, 150)
    _compress(kv, row, rid="c", protected=0, spec=parse_spec("streamingllm:0.5"), span=(4, 140))
    new = runner.token_to_kv_pool_allocator.alloc(6)
    runner.req_to_token_pool.req_to_token[row, 150:156] = new.to(torch.int32)
    fb = _batch(ForwardMode.EXTEND, [row], [156], new, prefix=[150], extend=[6])
    kv.init_forward_metadata(fb)
    for lid in range(LAYERS):
        q, k, v = torch.randn(6, Q_HEADS * D), torch.randn(6, KV_HEADS, D), torch.randn(
            6, KV_HEADS, D)
        out = kv.forward_extend(q, k, v, _layer(lid), fb).view(6, Q_HEADS, D)
        kept = _kept_slots(kv, row, lid)
        want = _sdpa(q.view(6, Q_HEADS, D), runner.token_to_kv_pool.get_key_buffer(lid),
                     runner.token_to_kv_pool.get_value_buffer(lid),
                     torch.cat([kept, new]), D ** -0.5, causal_from=kept.numel())
        assert torch.allclose(out, want, atol=1e-5)


def test_release_gives_back_the_physical_row():
    runner = _runner()
    kv = _backend(runner, python_decode=False)
    row, _ = _prefilled(runner, kv, 100)
    free_rows = runner.req_to_token_pool.available_size()
    _compress(kv, row, rid="c", protected=0, spec=parse_spec("knorm:0.5"), span=(0, 90))
    assert runner.req_to_token_pool.available_size() == free_rows - 1
    assert kv.rows.release(row) is not None
    assert runner.req_to_token_pool.available_size() == free_rows
    assert kv.rows.physical_row[row] == row and kv.rows.shift[row] == 0
