"""Optional parts: the error a core install gives, and the names the core keeps of them."""

from __future__ import annotations

import pytest

from kvrag.extras import EXTRAS, MissingExtraError, available, require


def test_a_missing_part_names_the_pip_extra_and_the_feature(monkeypatch):
    monkeypatch.setitem(EXTRAS, "rag", ("kvrag_no_such_module",))
    with pytest.raises(MissingExtraError, match=r"rag:512.*pip install 'kvrag\[rag\]'"):
        require("rag", "the system 'rag:512'")
    assert not available("rag")


def test_the_router_comes_with_the_sglang_extra(monkeypatch):
    monkeypatch.setitem(EXTRAS, "router", ("kvrag_no_such_module",))
    with pytest.raises(MissingExtraError, match=r"kvrag\[sglang\]"):
        require("router", "kvrag bench fleet")


def test_installed_parts_are_available():
    # not "train": TRL imported after an in-process SGLang engine trips on the plugin's
    # vllm stand-in (conftest.py); the GRPO tests import it
    assert available("rag") and available("sglang") and available("router")
