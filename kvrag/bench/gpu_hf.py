"""``kvrag bench gpu --engine hf``: the HF engine and training at the users' scale, on
one device, with nothing but PyTorch, transformers and PEFT.

1. A random-weight model shaped like Llama-3.1-8B is built where it runs (``torch.device``
   as the default device while its layers are made: weights are never in host memory
   first, nothing is downloaded).
2. One long prompt of seeded random token ids (documents, then a question tail) is
   answered by ``full``, by ``snapkv:0.0`` through the compressed path (it must give
   ``full``'s greedy tokens) and by each compressed system: the KV bytes its cache holds
   (tensor storage), the peak memory of the answer, prefill and compression seconds,
   decode tokens/s; medians over repeats, ratios to ``full`` measured in the same run.
3. One LoRA SFT step with gradient checkpointing at the training length, and one
   compression-aware SFT step (which cannot checkpoint: its prefill needs the layers' KV
   cache) at the longest length, halving from the training length, that fits under the
   memory cap. Each with its peak memory and seconds.

Peak memory is the CUDA allocator's on a GPU; on a CPU, the process's resident-set
high-water mark (reset before each measurement), which includes the weights.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvrag.bench.gpu_check import SHAPES, CheckSettings
from kvrag.compression import parse_spec
from kvrag.engines.chat import EncodedPrompt
from kvrag.engines.device import Placement
from kvrag.engines.hf import HFEngine
from kvrag.train.sft import IGNORE, Encoded, LoraSettings, target_loss

SYSTEMS = ("full", "snapkv:0.0", "snapkv:0.5", "snapkv:0.9",
           "snapkv[chunk=16;heads=shared]:0.5")
TRAIN_SPEC = "snapkv:0.5"  # the compression-aware step's
HEADER_TOKENS = 32  # prompt tokens before the documents (never evicted)
QUESTION_TOKENS = 64  # after them: the question, whose queries score the documents
TARGET_TOKENS = 32  # learned tokens of a training example
SHORTEST_TRY = 512  # the compression-aware step halves its length down to this
GIB = 1024 ** 3


@dataclass(frozen=True)
class HFCheckSettings(CheckSettings):
    train_tokens: int = 32000
    memory_cap_gib: float = 80.0  # the compression-aware step's budget (an 80 GB card)
    seed: int = 0


@dataclass(frozen=True)
class SystemRow:
    system: str
    same_tokens_as_full: bool
    kv_bytes: int  # storage of the cache tensors the decode starts from
    peak_bytes: int  # of one answer (prefill, compression, decode); medians over repeats
    prefill_s: float
    compress_s: float
    decode_tok_s: float
    kv_vs_full: float
    peak_vs_full: float
    decode_speed_vs_full: float


@dataclass(frozen=True)
class TrainRow:
    step: str
    prompt_tokens: int
    peak_bytes: int
    seconds: float
    loss: float
    out_of_memory_at: list[int] = field(default_factory=list)  # longer lengths tried


class PeakMemory:
    """The most memory the process holds over a ``with`` block: the CUDA allocator's peak
    on a GPU; on a CPU the resident set's high-water mark (``VmHWM``), reset on entry by
    writing 5 to ``/proc/self/clear_refs``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0

    @property
    def source(self) -> str:
        return ("CUDA allocator peak" if self.device.type == "cuda"
                else "process resident-set high-water mark")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            status = Path("/proc/self/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
            self.bytes = int(line.split()[1]) * 1024


def build_random_model(shape: str, placement: Placement, seed: int):
    """A seeded random-weight Llama of ``shape``, made on ``placement``'s device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvrag.engines import hf_attention

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(placement.device):
        model = AutoModelForCausalLM.from_config(config, dtype=placement.dtype,
                                                 attn_implementation=hf_attention.NAME)
    return model


def random_prompt(tokens: int, vocab: int, seed: int) -> EncodedPrompt:
    """``tokens`` seeded ids: a header, the documents, a question tail."""
    if tokens < HEADER_TOKENS + QUESTION_TOKENS + 64:
        raise ValueError(f"a prompt needs at least {HEADER_TOKENS + QUESTION_TOKENS + 64} "
                         f"tokens, got {tokens}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (tokens,), generator=generator).tolist()
    return EncodedPrompt(ids, HEADER_TOKENS, tokens - QUESTION_TOKENS)


def bench_systems(engine: HFEngine, enc: EncodedPrompt, new_tokens: int, repeats: int,
                  on_step: Callable[[str], None]) -> list[SystemRow]:
    """Every system answers ``enc`` from its own prefill, interleaved per repeat."""
    runs: dict[str, list] = {name: [] for name in SYSTEMS}
    for r in range(repeats):
        for name in SYSTEMS:
            on_step(f"{name} (repeat {r + 1}/{repeats})")
            spec = None if name == "full" else parse_spec(name)
            engine.release()
            gc.collect()
            with PeakMemory(engine.device) as peak:
                ids, cost = engine.generate_ids(enc, new_tokens, spec, ignore_eos=True)
            runs[name].append((ids, cost, peak.bytes))
    full_ids = runs["full"][0][0]

    def median(name: str, value: Callable) -> float:
        return statistics.median(value(cost, peak) for _, cost, peak in runs[name])

    measured = {name: (median(name, lambda c, p: c.kv_bytes), median(name, lambda c, p: p),
                       median(name, lambda c, p: (c.new_tokens - 1) / c.decode_s))
                for name in SYSTEMS}
    full_kv, full_peak, full_decode = measured["full"]
    return [SystemRow(name, all(ids == full_ids for ids, _, _ in runs[name]), int(kv),
                      int(peak), median(name, lambda c, p: c.prefill_s),
                      median(name, lambda c, p: c.compress_s), decode, kv / full_kv,
                      peak / full_peak, decode / full_decode)
            for name, (kv, peak, decode) in measured.items()]


def _train_step(model, enc: Encoded, spec_name: str | None,
                device: torch.device) -> tuple[float, int, float]:
    """One optimizer step on ``enc``: (loss, peak bytes, seconds)."""
    spec = parse_spec(spec_name) if spec_name else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with PeakMemory(device) as peak:
        t0 = time.perf_counter()
        loss = target_loss(model, enc, spec)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return loss.item(), peak.bytes, seconds


def training_example(tokens: int, vocab: int, seed: int) -> Encoded:
    prompt = random_prompt(tokens, vocab, seed)
    target = torch.randint(3, vocab, (TARGET_TOKENS,),
                           generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return Encoded(prompt.input_ids + target, [IGNORE] * tokens + target, prompt.span)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_training(base, settings: HFCheckSettings,
                   on_step: Callable[[str], None]) -> list[TrainRow]:
    """LoRA SFT steps on ``base``: with gradient checkpointing at the training length, and
    compression-aware at the longest length that fits under the memory cap."""
    from peft import get_peft_model

    device, vocab = base.device, base.config.vocab_size
    torch.manual_seed(settings.seed)
    model = get_peft_model(base, LoraSettings().peft_config())
    model.train()
    rows = []
    on_step(f"SFT step, gradient checkpointing, {settings.train_tokens:,} tokens")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    example = training_example(settings.train_tokens, vocab, settings.seed)
    loss, peak, seconds = _train_step(model, example, None, device)
    rows.append(TrainRow("sft, gradient checkpointing", settings.train_tokens, peak, seconds,
                         loss))
    base.gradient_checkpointing_disable()
    _free(device)
    tokens, failed = settings.train_tokens, []
    with capped_memory(device, settings.memory_cap_gib):
        while True:
            on_step(f"compression-aware SFT step ({TRAIN_SPEC}), {tokens:,} tokens")
            try:
                loss, peak, seconds = _train_step(
                    model, training_example(tokens, vocab, settings.seed), TRAIN_SPEC, device)
                break
            except torch.cuda.OutOfMemoryError:
                failed.append(tokens)
            # outside the except block: its traceback holds the failed step's tensors
            model.zero_grad(set_to_none=True)
            _free(device)
            if tokens // 2 < SHORTEST_TRY:
                raise RuntimeError(
                    f"the compression-aware step did not fit in {settings.memory_cap_gib} GiB "
                    f"at any length from {settings.train_tokens:,} down to {tokens:,} tokens")
            tokens //= 2
    rows.append(TrainRow(f"sft, compression-aware ({TRAIN_SPEC})", tokens, peak, seconds,
                         loss, failed))
    model.unload()  # the base model without its LoRA layers again
    return rows


@contextlib.contextmanager
def capped_memory(device: torch.device, cap_gib: float) -> Iterator[None]:
    """Hold the CUDA allocator to ``cap_gib`` on a larger card, so that an OOM means what
    it would on the card the figure is for; nothing to hold on a smaller card or a CPU."""
    total = (torch.cuda.get_device_properties(device).total_memory
             if device.type == "cuda" else 0)
    if total <= cap_gib * GIB:
        yield
        return
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_hf_check(settings: HFCheckSettings, out: Path,
                 on_step: Callable[[str], None] = lambda label: None) -> dict:
    """Run the check; the report, also written to ``out/gpu_hf.json`` and ``gpu_hf.md``."""
    import transformers

    placement = settings.placement
    device = placement.device
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    on_step(f"building a random {settings.shape} on {device}")
    with PeakMemory(device) as weights:
        model = build_random_model(settings.shape, placement, settings.seed)
    build_s = time.perf_counter() - t0
    engine = HFEngine.of_model(model, f"random-{settings.shape}")
    enc = random_prompt(settings.prompt_tokens, model.config.vocab_size, settings.seed)
    rows = bench_systems(engine, enc, settings.new_tokens, settings.repeats, on_step)
    engine.close()
    _free(device)
    train = bench_training(model, settings, on_step)
    report = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        **placement.to_json(), "torch": torch.__version__,
        "transformers": transformers.__version__, "shape": settings.shape,
        "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
        "repeats": settings.repeats, "memory": PeakMemory(device).source,
        "memory_cap_gib": settings.memory_cap_gib, "build_s": build_s,
        "build_peak_bytes": weights.bytes,
        "ratio0_same_tokens_as_full": next(r for r in rows if r.system == "snapkv:0.0")
        .same_tokens_as_full,
        "systems": [asdict(r) for r in rows], "training": [asdict(r) for r in train],
        "total_s": time.perf_counter() - t0,
    }
    (out / "gpu_hf.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_hf.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report as one Markdown page: a systems table and a training table."""
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    lines = [
        f"# kvrag bench gpu --engine hf: {report['device']} ({report['dtype']})",
        "",
        f"Random {report['shape']}, {report['prompt_tokens']:,}-token prompt, "
        f"{report['new_tokens']} decoded tokens, median of {report['repeats']}; torch "
        f"{report['torch']}, transformers {report['transformers']}. Peak: "
        f"{report['memory']}. Ratios to `full`, measured in the same run.",
        "",
        "| system | same tokens as full | KV MiB | KV/full | peak MiB | peak/full | prefill s "
        "| compress s | decode tok/s | decode/full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['system']} | {'yes' if r['same_tokens_as_full'] else 'no'} | "
              f"{mib(r['kv_bytes'])} | {r['kv_vs_full']:.2f} | {mib(r['peak_bytes'])} | "
              f"{r['peak_vs_full']:.2f} | {r['prefill_s']:.2f} | {r['compress_s']:.3f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_speed_vs_full']:.2f} |"
              for r in report["systems"]]
    lines += ["", "| training step | prompt tokens | peak MiB | seconds | loss "
              "| out of memory at |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['step']} | {t['prompt_tokens']:,} | {mib(t['peak_bytes'])} | "
              f"{t['seconds']:.2f} | {t['loss']:.3f} | "
              f"{', '.join(f'{n:,}' for n in t['out_of_memory_at']) or '-'} |"
              for t in report["training"]]
    lines += ["", f"Random model built in {report['build_s']:.1f} s; whole check "
              f"{report['total_s']:.0f} s; ratio 0 gives full's tokens: "
              f"{'yes' if report['ratio0_same_tokens_as_full'] else 'NO'}.", ""]
    return "\n".join(lines)
