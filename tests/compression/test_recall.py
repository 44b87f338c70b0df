"""The recall definition: what a question's queries bring back from a host store."""

import pytest
import torch

from kvrag.compression import parse_spec
from kvrag.compression.recall import (
    HostStore,
    choose,
    recall_indices,
    recall_scores,
    with_followers,
)


def test_scores_are_attention_weights_over_the_whole_logical_prompt() -> None:
    """Against a dense softmax over kept + evicted + the question's own keys (causal): the
    most any query gives a token, averaged over the query heads."""
    torch.manual_seed(0)
    q_heads, kv_heads, d, m, q = 4, 2, 8, 3, 5
    queries = torch.randn(q_heads, m, d)
    kept, evicted, own = (torch.randn(kv_heads, n, d) for n in (7, 11, q))
    scores = recall_scores(queries, kept, evicted, own)
    keys = torch.cat([kept, evicted, own], dim=1).repeat_interleave(2, dim=0)
    logits = queries @ keys.transpose(1, 2) / d ** 0.5
    own_pos = torch.arange(q)
    future = own_pos > torch.arange(q - m, q)[:, None]
    logits[:, :, 18:] = logits[:, :, 18:].masked_fill(future, float("-inf"))
    dense = logits.softmax(-1)[:, :, 7:18].amax(dim=1).mean(dim=0)
    assert torch.allclose(scores, dense, atol=1e-6)


def test_choice_ranks_chunks_once_for_all_layers_and_fills_each_layers_budget() -> None:
    # chunks of 4 from span start 10; layer 0 evicted {10, 11 | 14, 15, 16 | 20, 21},
    # layer 1 evicted {12, 13 | 14, 17 | 22, 23}: the same count, different tokens
    positions = torch.tensor([[10, 11, 14, 15, 16, 20, 21], [12, 13, 14, 17, 22, 23, 24]])
    scores = [torch.tensor([0.1, 0.1, 0.5, 0.4, 0.0, 0.9, 0.8]),
              torch.tensor([0.0, 0.0, 0.9, 0.9, 0.3, 0.3, 0.0])]
    # chunk means scaled to sum 1 per layer, then added: chunk 1 (14-17) .24 + .82, chunk
    # 2 (18-21) .68 + 0, chunk 3 (22-25) 0 + .18, chunk 0 (10-13) .08 + 0
    two = choose(scores, positions, (10, 30), 4, 2)
    assert [p.tolist() for p in two] == [[2, 3], [2, 3]]  # chunk 1 first, in both layers
    four = choose(scores, positions, (10, 30), 4, 4)
    # layer 0: all three of chunk 1, then chunk 2's best; layer 1: chunk 1's two, chunk 2
    # (none evicted there), then chunk 3's best two (ties to the earlier token)
    assert [p.tolist() for p in four] == [[2, 3, 4, 5], [2, 3, 4, 5]]
    assert [p.tolist() for p in choose(scores, positions, (10, 30), 4, 0)] == [[], []]


def test_followers_come_right_after_the_chunk_they_follow() -> None:
    rank = torch.tensor([3, 0, 4, 1, 2])  # chunk 1 best, then 3, 4, 0, 2
    assert torch.sort(with_followers(rank, 1)).indices.tolist() == [1, 2, 3, 4, 0]
    assert torch.sort(with_followers(rank, 2)).indices.tolist() == [1, 2, 3, 4, 0]
    assert torch.equal(with_followers(rank, 0), rank)
    assert torch.sort(with_followers(torch.tensor([0]), 3)).indices.tolist() == [0]


def test_after_recalls_the_text_that_follows_the_chunk_the_question_finds() -> None:
    # one layer, chunks of 4 from 10: the question looks at chunk 1 (14-17) only; the
    # answer sits in chunk 2 (18-21), which it does not look at
    positions = torch.tensor([[10, 11, 14, 15, 18, 19, 22, 23]])
    scores = [torch.tensor([0.2, 0.2, 0.9, 0.9, 0.0, 0.0, 0.1, 0.1])]
    assert choose(scores, positions, (10, 26), 4, 4)[0].tolist() == [0, 1, 2, 3]
    assert choose(scores, positions, (10, 26), 4, 4, after=1)[0].tolist() == [2, 3, 4, 5]


def test_host_store_keeps_exactly_the_evicted_entries_off_the_device() -> None:
    keys, values = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)  # [layer, heads, n, d]
    kept = [torch.tensor([0, 1, 5, 9]).expand(3, -1), torch.tensor([0, 2, 3, 9]).expand(3, -1)]
    store = HostStore.of(list(keys), list(values), kept, 10)
    assert store.positions.tolist() == [[2, 3, 4, 6, 7, 8], [1, 4, 5, 6, 7, 8]]
    assert torch.equal(store.keys[1][2], keys[1][:, 5])  # [kv_heads, d] of position 5
    assert store.keys[0].device.type == "cpu"
    assert store.nbytes == 2 * 2 * 6 * 3 * 4 * 4 + store.positions.numel() * 8
    k, v = store.fetch(0, torch.tensor([1]), "cpu", torch.float64)
    assert k.dtype == torch.float64 and torch.equal(v[0].float(), values[0][:, 3])


def test_a_question_recalls_the_chunk_its_queries_look_at() -> None:
    """One evicted chunk holds keys aligned with the question's queries: it is recalled."""
    torch.manual_seed(1)
    d, heads = 16, 2
    spec = parse_spec("once:snapkv[heads=shared]:0.5+recall[chunk=4]@4")
    keys = torch.randn(heads, 40, d) * 0.1
    target = torch.randn(d)
    keys[:, 24:28] = target * 3  # positions 24..27: one chunk from span start 8
    kept = [torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, *range(28, 40)]).expand(heads, -1)]
    store = HostStore.of([keys], [keys.clone()], kept, 40)
    queries = target.expand(heads, 2, d).clone()
    (idx,) = recall_indices(spec, [queries], [keys[:, kept[0][0]]], [torch.randn(heads, 3, d)],
                            store, (8, 40))
    assert store.positions[0][idx].tolist() == [24, 25, 26, 27]


def test_by_default_a_found_chunk_brings_the_16_tokens_after_it() -> None:
    """The defaults (8-token chunks, 2 followers): the question's queries find the key's
    chunk, and the value that follows it comes back with it."""
    torch.manual_seed(2)
    d, heads = 16, 2
    spec = parse_spec("once:snapkv[heads=shared]:0.5+recall@24")
    assert (spec.recall.chunk, spec.recall.after) == (8, 2)
    keys = torch.randn(heads, 64, d) * 0.1
    target = torch.randn(d)
    keys[:, 24:32] = target * 3  # the key: one chunk from span start 8
    kept = [torch.tensor([*range(8), *range(56, 64)]).expand(heads, -1)]
    store = HostStore.of([keys], [keys.clone()], kept, 64)
    queries = target.expand(heads, 2, d).clone()
    (idx,) = recall_indices(spec, [queries], [keys[:, kept[0][0]]], [torch.randn(heads, 3, d)],
                            store, (8, 64))
    assert store.positions[0][idx].tolist() == list(range(24, 48))


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_share_budgets_count_document_tokens(share) -> None:
    spec = parse_spec(f"once:snapkv[heads=shared]:0.5+recall:{share}")
    assert spec.recall.budget(400, 200) == min(200, int(400 * share))
