"""Where a spec can run: one check over what each method declares."""

from __future__ import annotations

import pytest

from kvrag.compression import METHODS, SpecError, parse_spec
from kvrag.compression.capabilities import Target, check, check_queries


@pytest.mark.parametrize("text", ["snapkv:0.5", "retrieval:0.5", "kvzip:0.5",
                                  "once:pyramidkv:0.5", "once:kvzip:0.5", "h2o@100"])
def test_the_hf_engine_runs_every_spec(text):
    check(parse_spec(text), Target.HF)


@pytest.mark.parametrize(("text", "target", "message"), [
    ("retrieval:0.5", Target.PLUGIN, "the SGLang plugin serves only methods that evict"),
    ("retrieval:0.5", Target.TRAINING, "picks keys per decoded token"),
    ("kvzip:0.5", Target.PLUGIN, "use once:kvzip:0.5"),
    ("once:pyramidkv:0.5", Target.PLUGIN, "one kept count for every layer"),
    ("once:snapkv:0.5", Target.TRAINING, "drop 'once:'"),
])
def test_each_refusal_names_its_reason(text, target, message):
    with pytest.raises(SpecError, match=message):
        check(parse_spec(text), target)


@pytest.mark.parametrize("text", ["snapkv:0.5", "pyramidkv:0.5", "tova[chunk=16]:0.5",
                                  "once:snapkv:0.5", "h2o:0.5",
                                  "once:snapkv[heads=ranked]:0.5", "once:kvzip:0.5",
                                  "once:kvzip[heads=ranked]@100"])
def test_what_the_plugin_serves(text):
    check(parse_spec(text), Target.PLUGIN)


@pytest.mark.parametrize("text", ["kvzip:0.5", "kvzip[heads=ranked;chunk=16]:0.5",
                                  "snapkv[heads=ranked]:0.5"])
def test_what_training_runs(text):
    check(parse_spec(text), Target.TRAINING)


def test_methods_declare_what_the_check_reads():
    assert not METHODS["pyramidkv"].uniform_layers and METHODS["snapkv"].uniform_layers
    assert METHODS["tova"].pools_heads and not METHODS["snapkv"].pools_heads
    assert parse_spec("snapkv[heads=shared]:0.5").pools_heads
    assert METHODS["retrieval"].dynamic and METHODS["kvzip"].reconstruction


def test_a_spec_is_built_once():
    spec = parse_spec("snapkv[window=32]:0.5")
    assert spec.build() is spec.build() is parse_spec("snapkv[window=32]:0.5").build()


def test_too_few_captured_queries_are_refused():
    check_queries(parse_spec("snapkv:0.5"), 64, 1000, "the engine", "keep more")
    check_queries(parse_spec("h2o:0.5"), 30, 30, "the engine", "keep more")  # all 30 kept
    with pytest.raises(SpecError, match="h2o scores with all prompt queries but the engine "
                                        "keeps 8; keep more"):
        check_queries(parse_spec("h2o:0.5"), 8, 100, "the engine", "keep more")
