"""Tensor parallelism: every rank, seeing only its KV heads, keeps what one rank keeps.

SGLang on this CPU does not start with ``tp_size=2`` (its NCCL communicator needs a CUDA
device), so the ranks are simulated here: two threads each score their half of the heads,
and ``HeadShard.gather`` is an all-gather across them, as ``get_tp_group().all_gather``
is in the plugin.
"""

from __future__ import annotations

import threading

import pytest
import torch

from kvrag.compression import HeadShard, kept_positions, parse_spec

KV_HEADS, GROUP, N, D, LAYERS = 4, 3, 90, 16, 3
SPAN = (5, 80)


def _inputs():
    torch.manual_seed(0)
    keys = [torch.randn(KV_HEADS, N, D) for _ in range(LAYERS)]
    queries = [torch.randn(KV_HEADS * GROUP, N, D) for _ in range(LAYERS)]
    return keys, queries


class _AllGather:
    """An all-gather along dim 0 between ``size`` threads, in rank order."""

    def __init__(self, size: int) -> None:
        self.parts: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)

    def for_rank(self, rank: int):
        def gather(local: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = local
            self.barrier.wait()
            out = torch.cat(self.parts)  # type: ignore[arg-type]
            self.barrier.wait()
            return out
        return gather


@pytest.mark.parametrize("spec", ["snapkv:0.5", "pyramidkv:0.5", "tova:0.5", "knorm:0.5",
                                  "streamingllm:0.5", "random:0.5", "h2o:0.5",
                                  "snapkv[heads=shared]:0.5", "knorm[chunk=8;heads=shared]:0.5",
                                  "tova[heads=shared]:0.5", "pyramidkv[chunk=16]:0.5"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_each_rank_keeps_what_one_rank_keeps_for_its_heads(spec, ranks):
    keys, queries = _inputs()
    whole = kept_positions(parse_spec(spec), keys, queries, SPAN)
    local = KV_HEADS // ranks
    gather = _AllGather(ranks)
    results: dict[int, list[torch.Tensor]] = {}

    def run(rank: int) -> None:
        heads = slice(rank * local, (rank + 1) * local)
        q_heads = slice(rank * local * GROUP, (rank + 1) * local * GROUP)
        shard = HeadShard(offset=rank * local, total=KV_HEADS, gather=gather.for_rank(rank))
        results[rank] = kept_positions(parse_spec(spec), [k[heads] for k in keys],
                                       [q[q_heads] for q in queries], SPAN, shard)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(ranks))
    for layer in range(LAYERS):
        split = torch.cat([results[r][layer] for r in range(ranks)])
        assert torch.equal(split, whole[layer]), f"{spec}, layer {layer}"


def test_without_the_gather_tova_would_differ_across_ranks():
    # the reason TOVA pools through the shard: each half's own average picks other tokens
    keys, queries = _inputs()
    whole = kept_positions(parse_spec("tova:0.5"), keys, queries, SPAN)
    half = kept_positions(parse_spec("tova:0.5"), [k[:2] for k in keys],
                          [q[:2 * GROUP] for q in queries], SPAN)
    assert not all(torch.equal(h, w[:2]) for h, w in zip(half, whole, strict=True))
