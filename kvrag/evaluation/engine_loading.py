"""The engine a compare run answers with, by name, and how many requests it keeps in flight."""

from __future__ import annotations

from pathlib import Path

from kvrag.compression import queries_needed
from kvrag.compression.capabilities import Target, check
from kvrag.engines.device import Placement
from kvrag.engines.sglang_options import SGLangOptions
from kvrag.evaluation.systems import CompressedContext, System

ENGINES = ("hf", "sglang", "sglang-url")


class EngineChoiceError(Exception):
    """An engine that cannot run these settings; the message says why."""


def load_engine(name: str, model_path: Path, systems: list[System], adapter: Path | None,
                placement: Placement, sglang: SGLangOptions, url: str | None,
                api_key: str | None):
    """The engine ``name`` over ``model_path``, set up for the compressed ``systems``."""
    if name == "hf":
        from kvrag.engines.hf import HFEngine

        specs = [s.spec for s in systems if isinstance(s, CompressedContext)]
        return HFEngine(model_path, capture_queries=queries_needed(specs), adapter=adapter,
                        device=placement.device, dtype=placement.dtype)
    if adapter is not None:
        raise EngineChoiceError(
            "--adapter runs on the hf engine; for sglang, merge it first with `kvrag train "
            "merge --adapter DIR --out CKPT` and pass --model CKPT")
    if name == "sglang-url":
        from kvrag.engines.sglang_url import SGLangURLEngine

        assert url is not None
        return SGLangURLEngine(url, model_path, api_key)
    if name == "sglang":
        from kvrag.engines.sglang_engine import SGLangEngine

        specs = [s.spec for s in systems if isinstance(s, CompressedContext)]
        try:
            for spec in specs:
                check(spec, Target.PLUGIN)
        except ValueError as e:
            raise EngineChoiceError(str(e)) from e
        return SGLangEngine(model_path, capture_all=queries_needed(specs) is None,
                            device=placement.device, dtype=placement.dtype,
                            **sglang.engine_kwargs())
    raise EngineChoiceError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")


def default_concurrency(engine: str, placement: Placement) -> int:
    """Requests in flight when --concurrency is not given. On a CPU, SGLang's prefill is
    compute-bound and the plugin decodes each request on its own, so more in flight only
    interleaves the same work (measured: 16 demo questions x 2 systems took 298 s one at a
    time and 344 s eight at a time)."""
    if engine == "hf" or (engine == "sglang" and placement.device.type == "cpu"):
        return 1
    return 16

