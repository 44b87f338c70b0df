"""The plugin's registration, as SGLang's plugin loader sees it."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import pytest

from kvrag.engine_plugin import register as plugin


def test_entry_point_names_register():
    found = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvrag"]
    assert len(found) == 1 and found[0].load() is plugin.register


_POLICY_TARGETS = {"sglang.srt.mem_cache.radix_cache.RadixCache._delete_leaf",
                   "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache._evict_device_leaf"}


def test_register_is_idempotent_and_fills_every_registry():
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        RADIX_EVICTION_POLICY_CHOICES,
    )
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry

    plugin.register()
    targets = [hook.target for hook in plugin.HOOKS]
    counts = {t: len(HookRegistry._hooks[t]) for t in targets}
    plugin.register()
    assert ATTENTION_BACKENDS["kvrag"] is plugin.create_backend
    assert ATTENTION_BACKEND_CHOICES.count("kvrag") == 1
    assert RADIX_EVICTION_POLICY_CHOICES.count("kvrag-cost") == 1
    assert "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend" in targets
    assert all(t in HookRegistry._patched for t in targets)
    # once each: the tree's eviction methods also carry the eviction policy's own hooks
    assert {t: len(HookRegistry._hooks[t]) for t in targets} == counts
    assert all(counts[h.target] == 1 + (h.target in _POLICY_TARGETS) for h in plugin.HOOKS)


def test_vllm_stand_in_only_without_cuda_and_vllm():
    import torch

    plugin.register()
    ops = sys.modules.get("vllm._custom_ops")
    if torch.cuda.is_available():  # SGLang does not import vllm on a CUDA host
        assert ops is None or "stand-in" not in (ops.rotary_embedding.__doc__ or "")
        return
    with pytest.raises(NotImplementedError, match="stand-in"):
        ops.rotary_embedding()


def test_only_inner_backends_that_read_rows_from_the_batch_are_wrapped(monkeypatch):
    from types import SimpleNamespace

    plugin.register()
    monkeypatch.setenv("KVRAG_INNER_BACKEND", "flashinfer")
    with pytest.raises(ValueError, match="choose one of torch_native, triton"):
        plugin.create_backend(SimpleNamespace(device="cuda"))
