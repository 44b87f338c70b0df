"""Compression in the training loop: what GRPO samples from, and what training refuses."""

from __future__ import annotations

import pytest
import torch

from kvrag.compression import SpecError, parse_spec
from kvrag.compression.capabilities import Target, check
from kvrag.engines.hf_attention import attention_hooks
from kvrag.train.compressed import (
    compressed_prefill,
    continuation_logits,
    sample_compressed,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from kvrag.engines.hf import HFEngine

    return HFEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt(small_instances):
    from kvrag.data.prompt import build_prompt

    return build_prompt(small_instances(1)[0])


@pytest.mark.parametrize("spec", ["snapkv:0.5", "streamingllm:0.7", "pyramidkv:0.5",
                                  "snapkv[chunk=16]:0.5", "tova[heads=shared]:0.5",
                                  "knorm[chunk=sentence;heads=shared]:0.5", "kvzip:0.5",
                                  "kvzip[heads=ranked]:0.5", "snapkv[chunk=4;heads=ranked]:0.5"])
def test_training_compresses_the_cache_the_engine_serves_from(engine, prompt, spec):
    compression = parse_spec(spec)
    enc = engine.encode(prompt)
    served = engine._start(enc, compression)
    with torch.no_grad():
        cache, first, _ = compressed_prefill(engine.model, torch.tensor([enc.input_ids]),
                                             enc.span, compression, engine.tokenizer)
    assert len(cache.layers) == len(served.cache.layers)
    for ours, theirs in zip(cache.layers, served.cache.layers, strict=True):
        assert ours.keys.shape[2] < len(enc.input_ids)
        torch.testing.assert_close(ours.keys, theirs.keys)
        torch.testing.assert_close(ours.values, theirs.values)
    torch.testing.assert_close(first[0, -1], served.logits.reshape(-1), atol=1e-5, rtol=1e-5)
    # near-greedy samples are the engine's greedy answer from that cache
    text = engine.generate(prompt, 8, compression=compression).text
    rows = sample_compressed(engine.model, enc.input_ids, enc.span, compression, rows=2,
                             max_new_tokens=8, temperature=1e-4, stop=engine.stop_ids,
                             tokenizer=engine.tokenizer)
    for row in rows:
        assert engine.tokenizer.decode([t for t in row if t not in engine.stop_ids],
                                       skip_special_tokens=True) == text


def test_samples_end_at_their_first_stop_token(engine, prompt):
    enc = engine.encode(prompt)
    spec = parse_spec("snapkv:0.5")
    generator = torch.Generator().manual_seed(0)
    free = sample_compressed(engine.model, enc.input_ids, enc.span, spec, 4, 12, 1.0, set(),
                             generator)
    assert all(len(row) == 12 for row in free)
    assert len({tuple(row) for row in free}) > 1  # sampled, not greedy
    stop = {free[0][3]}
    generator = torch.Generator().manual_seed(0)
    cut = sample_compressed(engine.model, enc.input_ids, enc.span, spec, 4, 12, 1.0, stop,
                            generator)
    assert cut[0] == free[0][:free[0].index(free[0][3]) + 1]
    assert all(row[-1] in stop or len(row) == 12 for row in cut)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "snapkv[heads=ranked]"])
def test_continuation_logits_are_the_decoding_logits(engine, prompt, method):
    # scoring a continuation in one block equals decoding it token by token
    spec = parse_spec(f"{method}:0.5")
    enc = engine.encode(prompt)
    ids = torch.tensor([enc.input_ids])
    continuation = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        block = continuation_logits(engine.model, ids, continuation, enc.span, spec)
        whole = continuation_logits(engine.model, ids, continuation, enc.span,
                                    parse_spec("snapkv:0.0"))
        cache, first, reading = compressed_prefill(engine.model, ids, enc.span, spec)
        steps = [first[:, -1]]
        for t in range(continuation.shape[1] - 1):
            position = torch.tensor([[ids.shape[1] + t]])
            with attention_hooks(reading):
                steps.append(engine.model(input_ids=continuation[:, t:t + 1],
                                          position_ids=position,
                                          past_key_values=cache).logits[:, -1])
    torch.testing.assert_close(block[0], torch.cat(steps), atol=1e-4, rtol=1e-4)
    full = engine.model(input_ids=torch.cat([ids, continuation], 1)).logits[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(whole, full, atol=1e-4, rtol=1e-4)  # nothing evicted: the plain
    assert (block - whole).abs().max() > 1e-3  # evicting half changes what the model predicts
    # a group's completions share one prefill; each row still scores as if alone
    other = torch.tensor([[8, 2, 41, 7]])
    with torch.no_grad():
        both = continuation_logits(engine.model, ids, torch.cat([continuation, other]),
                                   enc.span, spec)
        alone = continuation_logits(engine.model, ids, other, enc.span, spec)
    torch.testing.assert_close(both[0], block[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("spec", "message"), [
    ("once:snapkv:0.5", "drop 'once:'"),
    ("retrieval:0.5", "picks keys per decoded token"),
])
def test_specs_training_cannot_reproduce_are_refused(spec, message):
    with pytest.raises(SpecError, match=message):
        check(parse_spec(spec), Target.TRAINING)
