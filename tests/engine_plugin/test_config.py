"""Per-server and per-request compression settings of the plugin."""

from __future__ import annotations

import pytest

from kvrag.compression import SpecError
from kvrag.engine_plugin import config


@pytest.fixture(autouse=True)
def no_server_spec(monkeypatch):
    monkeypatch.delenv(config.ENV_COMPRESSION, raising=False)
    monkeypatch.delenv(config.ENV_CAPTURE, raising=False)
    monkeypatch.delenv(config.ENV_ALLOWED, raising=False)


def test_request_spec_and_default_span():
    wanted = config.for_request({"kvrag_compression": "snapkv:0.5"}, 1000)
    assert wanted is not None and wanted.spec.name == "snapkv:0.5"
    assert wanted.span == (0, 1000 - config.PROTECTED_TAIL)


def test_request_span_is_used_and_checked():
    wanted = config.for_request({"kvrag_compression": "knorm@100", "kvrag_span": [5, 900]}, 1000)
    assert wanted is not None and wanted.span == (5, 900)
    for bad in ([5], [900, 5], [0, 1001], ["a", 3]):
        with pytest.raises(SpecError, match="kvrag_span"):
            config.for_request({"kvrag_compression": "knorm@100", "kvrag_span": bad}, 1000)


def test_server_default_and_request_override(monkeypatch):
    monkeypatch.setenv(config.ENV_COMPRESSION, "streamingllm:0.9")
    assert config.for_request(None, 500).spec.name == "streamingllm:0.9"
    assert config.for_request({"kvrag_compression": "none"}, 500) is None
    monkeypatch.setenv(config.ENV_COMPRESSION, "snapkv:1.2")
    with pytest.raises(SpecError, match="KVRAG_COMPRESSION='snapkv:1.2'.*0 <= RATIO < 1"):
        config.for_request(None, 500)


@pytest.mark.parametrize("params,n", [
    ({"kvrag_compression": "snapkv:0.5"}, config.PROTECTED_TAIL),  # all inside the tail
    ({"kvrag_compression": "snapkv@5000"}, 1000),  # the budget keeps everything
    ({}, 1000),  # no spec anywhere
])
def test_nothing_to_evict_means_no_compression(params, n):
    assert config.for_request(params, n) is None


def test_invalid_and_dynamic_specs_are_refused():
    with pytest.raises(SpecError, match="custom_params.kvrag_compression='bogus:0.5'"):
        config.for_request({"kvrag_compression": "bogus:0.5"}, 500)
    with pytest.raises(SpecError, match="HF engine"):
        config.for_request({"kvrag_compression": "retrieval:0.5"}, 500)
    with pytest.raises(SpecError, match="reconstruction forward passes"):
        config.for_request({"kvrag_compression": "kvzip:0.5"}, 500)


def test_capture_follows_the_method_or_the_override(monkeypatch):
    from kvrag.compression import parse_spec

    assert config.capture_queries(None) == config.DEFAULT_CAPTURE
    assert config.capture_queries(parse_spec("snapkv:0.5")) == 64
    assert config.capture_queries(parse_spec("h2o:0.5")) is None
    monkeypatch.setenv(config.ENV_CAPTURE, "all")
    assert config.capture_queries(parse_spec("snapkv:0.5")) is None
    monkeypatch.setenv(config.ENV_CAPTURE, "zero")
    with pytest.raises(SpecError, match="KVRAG_CAPTURE_QUERIES"):
        config.capture_queries(None)


def test_malformed_custom_params_are_refused():
    with pytest.raises(SpecError, match="custom_params must be an object"):
        config.for_request("snapkv:0.5", 500)


def test_engine_environ_restores_what_was_there(monkeypatch):
    import os

    from kvrag.engine_plugin.config import ENV_COMPRESSION, ENV_STATS, engine_environ

    monkeypatch.setenv(ENV_COMPRESSION, "snapkv:0.5")
    monkeypatch.delenv(ENV_STATS, raising=False)
    with engine_environ({ENV_COMPRESSION: "none", ENV_STATS: "/tmp/s.jsonl"}):
        assert os.environ[ENV_COMPRESSION] == "none"
        assert os.environ[ENV_STATS] == "/tmp/s.jsonl"
    assert os.environ[ENV_COMPRESSION] == "snapkv:0.5"
    assert ENV_STATS not in os.environ


def test_the_operator_limits_what_requests_may_ask_for(monkeypatch):
    monkeypatch.setenv(config.ENV_COMPRESSION, "snapkv:0.5")
    monkeypatch.setenv(config.ENV_ALLOWED, "snapkv:0.50, none")
    assert config.for_request({"kvrag_compression": "snapkv:0.5"}, 1000) is not None
    assert config.for_request({"kvrag_compression": "none"}, 1000) is None
    assert config.for_request({}, 1000) is not None  # the server's own spec
    with pytest.raises(SpecError, match=r"kvrag_compression='h2o:0.5' is not allowed on this "
                                        r"server; allowed: none, snapkv:0.5"):
        config.for_request({"kvrag_compression": "h2o:0.5"}, 1000)
    monkeypatch.setenv(config.ENV_ALLOWED, "snapkv:0.5")
    with pytest.raises(SpecError, match="'none' is not allowed"):
        config.for_request({"kvrag_compression": "none"}, 1000)


def test_decode_path_defaults_to_python_over_torch_native_only(monkeypatch):
    monkeypatch.delenv(config.ENV_DECODE_PATH, raising=False)
    assert config.python_decode("torch_native") and not config.python_decode("triton")
    monkeypatch.setenv(config.ENV_DECODE_PATH, "inner")
    assert not config.python_decode("torch_native")
    monkeypatch.setenv(config.ENV_DECODE_PATH, "python")
    assert config.python_decode("triton")
    monkeypatch.setenv(config.ENV_DECODE_PATH, "fast")
    with pytest.raises(SpecError, match="use 'python' or 'inner'"):
        config.python_decode("triton")


def test_parameters_routed_in_extra_key_are_read_and_the_key_cleared():
    params = {"kvrag_compression": "once:snapkv:0.5", "kvrag_span": [3, 900]}
    key = config.routed_params(params)
    assert key.startswith(config.EXTRA_KEY_PREFIX)
    assert config.request_params(None, key) == (params, None)
    # another caller's extra_key is theirs: left alone, custom_params read as before
    assert config.request_params({"kvrag_compression": "none"}, "tenant-7") == (
        {"kvrag_compression": "none"}, "tenant-7")
    with pytest.raises(SpecError, match="not followed by a JSON object"):
        config.request_params(None, config.EXTRA_KEY_PREFIX + "[1, 2]")
    with pytest.raises(SpecError, match="both in custom_params and in extra_key"):
        config.request_params({"kvrag_span": [0, 5]}, key)
