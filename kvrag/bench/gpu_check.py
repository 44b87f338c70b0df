"""``kvrag bench gpu``: the plugin at the users' scale, on one CUDA device, in one command.

1. A random-weight checkpoint shaped like Llama-3.1-8B is written as a config and a
   tokenizer only: SGLang's ``load_format="dummy"`` fills the weights (seeded, the same in
   every engine), so nothing is downloaded and no 16 GB file is written.
2. The serving benchmark on a long prompt (32k tokens by default): triton with CUDA
   graphs (what operators run: the baseline), triton without them, and the kvrag backend
   over triton (which runs without) at ratio 0, ``snapkv:0.5`` and ``snapkv:0.9``: the
   same greedy tokens as triton at ratio 0, KV slots freed, decode tokens/s as ratios to
   the baseline.
3. The same under load (``kvrag bench serving --concurrency``): ``load_requests``
   distinct prompts of that length at once against a pool that holds 4 full ones, triton
   ``full`` against kvrag ``none``, ``snapkv:0.5`` and ``snapkv:0.9``: requests running at
   once beside the memory bound, tokens/s, TTFT and TPOT as ratios to triton.
4. ``kvrag compare --engine sglang`` on a few demo questions with a real model, on the
   same device, for the side-by-side table.

Every step runs on a CPU too (``--device cpu --shape tiny``): that is how it is tested.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvrag.engines.device import Placement

# Llama-3.1-8B's published architecture (GQA 32/8, 128k context with llama3 RoPE scaling)
LLAMA31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
# the same family at a size a 2-core CPU runs in seconds
TINY = LLAMA31_8B | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
SHAPES = {"llama3.1-8b": LLAMA31_8B, "tiny": TINY}
RATIOS = (0.0, 0.5, 0.9)


@dataclass(frozen=True)
class CheckSettings:
    """What both GPU checks (SGLang's and the HF engine's) run: a random model of
    ``shape`` on ``placement``, answering a ``prompt_tokens`` prompt ``repeats`` times."""

    placement: Placement
    shape: str = "llama3.1-8b"
    prompt_tokens: int = 32000
    new_tokens: int = 64
    repeats: int = 3


@dataclass(frozen=True)
class GpuCheckSettings(CheckSettings):
    compare_model: str = "smollm2"  # real weights, so the compare table means something
    questions: int = 8
    load_requests: int = 12


def write_random_checkpoint(out: Path, shape: str, tokenizer_dir: Path) -> Path:
    """A checkpoint directory without weights: ``config.json`` of ``shape`` plus the
    tokenizer of ``tokenizer_dir`` (its ids fit in any larger vocabulary)."""
    from transformers import AutoTokenizer, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_gpu_check(settings: GpuCheckSettings, out: Path, tokenizer_dir: Path,
                  on_step: Callable[[str], None] = lambda label: None) -> dict:
    """Run the four steps; the report (also written to ``out/gpu_check.json``)."""
    import sglang
    import torch

    from kvrag.bench.serving import baselines, bench_serving
    from kvrag.bench.serving_load import bench_serving_load

    placement = settings.placement
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = write_random_checkpoint(out / f"random-{settings.shape}", settings.shape,
                                         tokenizer_dir)
    on_step("serving benchmark")
    prompt_tokens, rows = bench_serving(
        checkpoint, "snapkv", RATIOS, settings.prompt_tokens, settings.new_tokens,
        settings.repeats, on_step=on_step, placement=placement, load_format="dummy")
    by_system = {r.system: r for r in rows}
    base = by_system[baselines(placement)[0][0]]
    checks = {
        "ratio0_same_tokens_as_inner": by_system["kvrag snapkv:0.0"].same_tokens_as_inner,
        "none_same_tokens_as_inner": by_system["kvrag none"].same_tokens_as_inner,
        **{f"slots_freed_at_{ratio}": 1 - by_system[f"kvrag snapkv:{ratio}"].kv_vs_base
           for ratio in RATIOS[1:]},
        **{f"decode_speed_{ratio}_vs_base": by_system[f"kvrag snapkv:{ratio}"]
           .decode_speed_vs_base for ratio in RATIOS[1:]},
    }
    on_step("serving under load")
    load_settings, load_rows = bench_serving_load(
        checkpoint, "snapkv", RATIOS[1:], settings.load_requests, settings.prompt_tokens,
        settings.new_tokens, on_step=on_step, placement=placement, load_format="dummy")
    on_step("kvrag compare --engine sglang")
    compare = _compare(settings, out / "compare")
    report = {
        "device": (torch.cuda.get_device_name(placement.device)
                   if placement.device.type == "cuda" else "cpu"),
        **placement.to_json(), "sglang": sglang.__version__, "shape": settings.shape,
        "base_backend": base.system, "prompt_tokens": prompt_tokens,
        "new_tokens": settings.new_tokens, "repeats": settings.repeats, "checks": checks,
        "serving_rows": [r.to_json() for r in rows], "load": load_settings,
        "load_rows": [r.to_json() for r in load_rows], "compare": compare,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _compare(settings: GpuCheckSettings, out: Path) -> dict:
    """``kvrag compare`` as a user runs it, in its own process (its own SGLang engine)."""
    placement = settings.placement
    cmd = [str(Path(sys.executable).with_name("kvrag")), "compare", "--engine", "sglang",
           "--model", settings.compare_model, "--device", str(placement.device),
           "--dtype", placement.dtype_name, "--limit", str(settings.questions),
           "--systems", "full,snapkv:0.5", "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    systems = json.loads((out / "summary.json").read_text())["systems"]
    keep = ("n", "subem", "kv_tokens_mean", "latency_s_mean", "truncated")
    return {"command": " ".join(cmd), "wall_s": seconds,
            "systems": {name: {k: s.get(k) for k in keep} for name, s in systems.items()}}
