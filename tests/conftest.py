"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be downloaded: every model comes from an installed package or is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



def pytest_collection_finish(session: pytest.Session) -> None:
    """Import TRL's GRPO before any test runs, where a selected test is marked ``trl``.

    TRL looks for vllm when it is imported. Once SGLang has loaded in this process (tests
    that start an in-process engine), the plugin's CPU stand-in for vllm._custom_ops sits
    in sys.modules without a module spec, which that look-up cannot read; in the product,
    TRL and SGLang never share a process. Other runs never load TRL.
    """
    if any(item.get_closest_marker("trl") for item in session.items):
        import trl.trainer.grpo_trainer  # noqa: F401


@pytest.fixture(scope="session")
def kvrag_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("kvrag_home")
    os.environ["KVRAG_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from kvrag.engines.models import PACKAGED_MODELS, load_gguf_tokenizer, packaged_file

    return load_gguf_tokenizer(packaged_file(PACKAGED_MODELS["smollm2"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A 2-layer random Llama (GQA: 4 query heads, 2 KV heads) saved as a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, tie_word_embeddings=True,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        bos_token_id=smollm2_tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = smollm2_tokenizer.eos_token_id
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out
