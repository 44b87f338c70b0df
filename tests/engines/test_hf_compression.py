"""Compression inside the HF engine on the tiny Llama: real cache shrinkage, real decoding."""

import pytest
import torch

from kvrag.compression import METHODS, parse_spec
from kvrag.data.loaders import load_dataset
from kvrag.data.prompt import build_prompt
from kvrag.engines import hf_attention
from kvrag.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir, capture_queries=None)  # h2o needs every query


@pytest.fixture(scope="module")
def prompt():
    return build_prompt(load_dataset("demo")[0])


def test_engine_refuses_a_method_it_kept_too_few_queries_for(tiny_model_dir, prompt) -> None:
    engine = HFEngine(tiny_model_dir, capture_queries=8)
    with pytest.raises(ValueError,
                       match="h2o scores with all prompt queries but the engine keeps 8"):
        engine.generate(prompt, 2, compression=parse_spec("h2o:0.5"))
    assert engine.generate(prompt, 2, compression=parse_spec("tova:0.5")).cost.new_tokens == 2


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ratio_zero_reproduces_full_exactly(engine: HFEngine, prompt, method: str) -> None:
    full = engine.generate(prompt, max_new_tokens=8)
    same = engine.generate(prompt, max_new_tokens=8, compression=parse_spec(f"{method}:0"))
    assert same.text == full.text
    assert same.cost.kv_tokens == full.cost.kv_tokens


@pytest.mark.parametrize("spec", ["snapkv:0.5", "streamingllm:0.75", "random:0.9", "h2o@300",
                                  "knorm:0.5", "tova:0.5"])
def test_cache_really_shrinks_to_the_spec(engine: HFEngine, prompt, spec: str) -> None:
    enc = engine.encode(prompt)
    n, n_doc = len(enc.input_ids), enc.context_end - enc.context_start
    compression = parse_spec(spec)
    expected = n - n_doc + compression.kept(n_doc)
    pre = engine.prefill(enc.input_ids)
    shrunk = engine.compress(pre, enc.span, compression)
    for layer in range(engine.n_layers):
        keys = shrunk.cache.layers[layer].keys
        assert keys.shape[2] == expected  # physically fewer tokens, not a mask
        assert shrunk.cache.layers[layer].values.shape == keys.shape
    gen = engine.generate(prompt, max_new_tokens=6, compression=compression)
    assert gen.cost.kv_tokens == expected and gen.cost.doc_tokens == n_doc
    assert gen.cost.kv_bytes == expected * engine.n_layers * 2 * 2 * 16 * 4
    assert gen.cost.new_tokens == 6 and isinstance(gen.text, str) and gen.text


def test_pyramidkv_layers_keep_different_counts_with_the_same_total(engine, prompt) -> None:
    enc = engine.encode(prompt)
    n, n_doc = len(enc.input_ids), enc.context_end - enc.context_start
    spec = parse_spec("pyramidkv:0.5")
    shrunk = engine.compress(engine.prefill(enc.input_ids), enc.span, spec)
    lengths = [shrunk.cache.layers[i].keys.shape[2] for i in range(engine.n_layers)]
    assert lengths[0] > lengths[1]
    assert sum(lengths) == engine.n_layers * (n - n_doc + spec.kept(n_doc))
    assert engine.generate(prompt, 4, compression=spec).cost.new_tokens == 4


def test_kept_tokens_are_the_method_selection(engine: HFEngine, prompt) -> None:
    """The cache holds exactly the original keys of the tokens the method selected."""
    enc = engine.encode(prompt)
    pre = engine.prefill(enc.input_ids)
    shrunk = engine.compress(pre, enc.span, parse_spec("snapkv:0.5"))
    idx = shrunk.kept[1]
    original = pre.cache.layers[1].keys[0]
    for head in range(idx.shape[0]):
        torch.testing.assert_close(shrunk.cache.layers[1].keys[0, head], original[head, idx[head]])


@torch.inference_mode()
def test_decoding_continues_at_the_original_positions(engine: HFEngine, prompt) -> None:
    """StreamingLLM keeps the same tokens in every layer and head, so its physically
    compressed cache must give the same next-token logits as the full cache with the
    evicted tokens masked out."""
    enc = engine.encode(prompt)
    n = len(enc.input_ids)
    pre = engine.prefill(enc.input_ids)
    shrunk = engine.compress(pre, enc.span, parse_spec("streamingllm:0.6"))
    kept = shrunk.kept[0][0]
    assert all(torch.equal(k[h], kept) for k in shrunk.kept for h in range(k.shape[0]))
    token = torch.tensor([[int(pre.last_logits.argmax())]])
    position = torch.tensor([[n]])
    compressed = engine.model(input_ids=token, position_ids=position,
                              past_key_values=shrunk.cache).logits[0, -1]
    full = engine.compress(pre, enc.span, None).cache
    mask = torch.zeros(1, 1, 1, n + 1, dtype=torch.bool)
    mask[..., kept] = True
    mask[..., n] = True
    masked = engine.model(input_ids=token, position_ids=position, past_key_values=full,
                          attention_mask=mask).logits[0, -1]
    torch.testing.assert_close(compressed, masked, rtol=1e-4, atol=1e-4)


def test_one_prefill_serves_every_system(engine: HFEngine, prompt) -> None:
    a = engine.generate(prompt, 3)
    pre = engine.prefill(engine.encode(prompt).input_ids)
    b = engine.generate(prompt, 3, compression=parse_spec("snapkv:0.5"))
    assert engine.prefill(engine.encode(prompt).input_ids) is pre
    assert a.cost.prefill_s == b.cost.prefill_s == pre.seconds


def test_retrieval_keeps_the_cache_and_attends_to_top_k(engine: HFEngine, prompt) -> None:
    enc = engine.encode(prompt)
    n, n_doc = len(enc.input_ids), enc.context_end - enc.context_start
    spec = parse_spec("retrieval:0.9")
    gen = engine.generate(prompt, 5, compression=spec)
    assert gen.cost.kv_tokens == n
    assert gen.cost.attended_tokens == n - n_doc + spec.kept(n_doc)
    assert gen.cost.new_tokens == 5


@torch.inference_mode()
def test_retrieval_mask_changes_what_decoding_sees(engine: HFEngine, prompt) -> None:
    enc = engine.encode(prompt)
    pre = engine.prefill(enc.input_ids)
    token = torch.tensor([[int(pre.last_logits.argmax())]])
    position = torch.tensor([[len(enc.input_ids)]])

    def next_logits(hooks: hf_attention.AttentionHooks) -> torch.Tensor:
        cache = engine.compress(pre, enc.span, None).cache
        with hf_attention.attention_hooks(hooks):
            return engine.model(input_ids=token, position_ids=position,
                                past_key_values=cache).logits[0, -1]

    full = next_logits(hf_attention.AttentionHooks())
    n_doc = enc.context_end - enc.context_start
    everything = next_logits(hf_attention.AttentionHooks(retrieval=(enc.span, n_doc)))
    few = next_logits(hf_attention.AttentionHooks(retrieval=(enc.span, 8)))
    torch.testing.assert_close(everything, full)
    assert (few - full).abs().max() > 1e-3


@pytest.mark.parametrize("spec", ["snapkv[heads=ranked]:0.5", "kvzip[heads=ranked]:0.5",
                                  "once:kvzip[heads=ranked;chunk=16]:0.5"])
def test_ranked_heads_answer_as_the_full_cache_masked_to_their_kept_sets(engine, prompt, spec):
    """Heads keeping different counts are padded to one width and masked; the answer must be
    what the full cache gives with every head masked to its own kept set (kvpress's way)."""
    from kvrag.compression.select import PAD, kept_counts

    compression = parse_spec(spec)
    enc = engine.encode(prompt)
    once = compression.once
    ids = enc.input_ids[:enc.context_end] if once else enc.input_ids
    pre = engine._prefill(ids)
    shrunk = engine.compress(pre, enc.span, compression)
    counts = [kept_counts(idx) for idx in shrunk.kept]
    assert len({int(c.sum()) for c in counts}) == 1  # the same total in every layer
    assert any(len(set(c.tolist())) > 1 for c in counts)  # but not per head
    assert shrunk.valid is not None
    got = engine.generate(prompt, 6, compression=compression)
    # the reference: the whole prompt's cache, each head masked to its kept positions
    n = len(enc.input_ids)
    valid = []
    for idx in shrunk.kept:
        mask = torch.zeros(idx.shape[0], n, dtype=torch.bool)
        for h, row in enumerate(idx.tolist()):
            mask[h, [p for p in row if p != PAD]] = True
        mask[:, len(ids):] = True  # a once: question is never evicted
        valid.append(mask)
    full = engine._prefill(ids)
    hooks = hf_attention.AttentionHooks(head_valid=valid)
    out, cache, new = None, full.cache, []
    with hf_attention.attention_hooks(hooks), torch.no_grad():
        step = enc.input_ids[len(ids):] if once else []
        logits = full.last_logits
        if step:
            logits = engine.model(input_ids=torch.tensor([step]),
                                  position_ids=torch.arange(len(ids), n)[None],
                                  past_key_values=cache, use_cache=True).logits[0, -1]
        position = n
        for _ in range(6):
            token = int(logits.argmax())
            if token in engine.stop_ids:
                break
            new.append(token)
            out = engine.model(input_ids=torch.tensor([[token]]),
                               position_ids=torch.tensor([[position]]),
                               past_key_values=cache, use_cache=True)
            logits, position = out.logits[0, -1], position + 1
    assert got.text == engine.tokenizer.decode(new, skip_special_tokens=True)
    assert got.cost.kv_bytes >= engine.kv_bytes_per_token_layer * sum(
        int(c.max()) for c in counts)  # what the padded cache holds


RECALL = "once:snapkv[chunk=16;heads=shared]:0.75"


def test_recalling_every_evicted_token_answers_as_the_full_cache(engine, prompt) -> None:
    """With a budget of everything the corpus evicted, kept + recalled is the whole corpus,
    so the question prefilled again over it answers as the full cache does."""
    enc = engine.encode(prompt)
    n_doc = enc.context_end - enc.context_start
    full = engine.generate(prompt, 8)
    every = engine.generate(prompt, 8, parse_spec(f"{RECALL}+recall@{n_doc}"))
    assert every.text == full.text
    assert every.cost.kv_tokens == full.cost.kv_tokens
    assert every.cost.recalled_tokens == n_doc - parse_spec(RECALL).kept(n_doc)


def test_recall_holds_its_tokens_on_the_device_and_the_rest_on_the_host(engine, prompt):
    enc = engine.encode(prompt)
    n_doc, question = enc.context_end - enc.context_start, len(enc.input_ids) - enc.context_end
    base = parse_spec(RECALL)
    kept = enc.context_start + base.kept(n_doc)
    engine.generate(prompt, 1, base)  # the corpus is built once for each system
    with torch.inference_mode():
        for spec in (f"{RECALL}+recall@64", f"{RECALL}+recall[reprefill=0]@64"):
            compression = parse_spec(spec)
            answer = engine.generate(prompt, 4, compression)
            cost = answer.cost
            assert cost.kv_tokens == kept + 64 + question and cost.shared_kv_tokens == kept
            assert cost.recalled_tokens == 64 and cost.recall_s > 0
            corpus = engine._once[(tuple(enc.input_ids[:enc.context_end]), spec)]
            assert cost.host_kv_bytes == corpus.host.nbytes
            layer = corpus.cache.layers[0]
            evicted = n_doc - base.kept(n_doc)
            per_token = 2 * layer.keys[0, :, 0].numel() * layer.keys.element_size()
            assert cost.host_kv_bytes >= evicted * engine.n_layers * per_token
            # the device cache holds kept + recalled + question, nothing of the host store
            start = engine._start_once(enc, compression)
            assert start.cache.layers[0].keys.shape[2] == kept + 64 + question
            assert cost.kv_bytes == start.cache.layers[0].keys.nbytes * 2 * engine.n_layers


def test_a_short_extend_captures_every_query_it_has(engine, prompt) -> None:
    """A question shorter than the capture window keeps all its queries (recall scores
    with them), not the window's last few."""
    from kvrag.engines.hf import copy_cache

    enc = engine.encode(prompt)
    question = enc.input_ids[enc.context_end:]
    pre = engine.prefill(enc.input_ids[:enc.context_end])
    with torch.inference_mode():
        _, _, captured = engine._extend(copy_cache(pre.cache), question[:10], enc.context_end,
                                        None, True)
    assert captured[0].shape[1] == 10
