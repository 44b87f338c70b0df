"""``kvrag serve``: a real SGLang HTTP server (OpenAI-compatible) with the kvrag plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import console, fail
from kvrag.compression import SpecError, parse_spec
from kvrag.engine_plugin import config
from kvrag.engines.models import ModelNotFoundError, resolve_model

EVICTION_POLICIES = ("lru", "lfu", "fifo", "mru", "filo", "priority", "slru", "tlru",
                     "kvrag-cost")


def server_command(model_path: Path, host: str, port: int, eviction_policy: str,
                   eviction_config: str | None, max_total_tokens: int | None,
                   device: str) -> list[str]:
    """The ``sglang.launch_server`` command line for the plugin's backend on ``device``."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", host, "--port", str(port), "--device", device,
           "--attention-backend", "kvrag", "--radix-eviction-policy", eviction_policy,
           # compaction runs between batches and outside CUDA graphs (see engine_plugin)
           "--disable-overlap-schedule", "--disable-cuda-graph"]
    if device == "cpu":
        cmd += ["--dtype", "float32", "--mem-fraction-static", "0.3"]
    if eviction_config:
        cmd += ["--radix-eviction-policy-config", eviction_config]
    if max_total_tokens:
        cmd += ["--max-total-tokens", str(max_total_tokens)]
    return cmd


def serve(
    model: Annotated[str, typer.Option(
        help="A packaged model name (smollm2) or a local HF checkpoint dir.")] = "smollm2",
    compression: Annotated[str | None, typer.Option(
        help="Server default, e.g. snapkv:0.5; requests may override it with "
             "custom_params.kvrag_compression (or 'none').")] = None,
    eviction_policy: Annotated[str, typer.Option(
        help=f"Radix-cache eviction: {', '.join(EVICTION_POLICIES)}.")] = "kvrag-cost",
    eviction_config: Annotated[str | None, typer.Option(
        help='JSON options of the policy, e.g. \'{"frequency_exponent": 0.5}\'.')] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 30000,
    max_total_tokens: Annotated[int | None, typer.Option(
        min=64, help="KV pool size in tokens (default: SGLang's, from memory).")] = None,
) -> None:
    """Serve MODEL with compressed-KV attention and a cost-aware radix cache.

    The OpenAI-compatible API is at http://HOST:PORT/v1. Each request's compression can
    be set with extra_body={"custom_params": {"kvrag_compression": "snapkv:0.75"}}.
    """
    if eviction_policy not in EVICTION_POLICIES:
        fail(f"unknown eviction policy {eviction_policy!r}; use one of "
             f"{', '.join(EVICTION_POLICIES)}")
    try:
        if compression:
            config.check_servable(parse_spec(compression))
        model_path = resolve_model(model, console)
    except (SpecError, ModelNotFoundError) as e:
        fail(str(e))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cmd = server_command(model_path, host, port, eviction_policy, eviction_config,
                         max_total_tokens, device)
    env = os.environ | {config.ENV_COMPRESSION: compression or "none"}
    console.print(f"Serving {model} on http://{host}:{port}/v1 ({device}; compression "
                  f"{compression or 'none'}; eviction {eviction_policy})")
    process = subprocess.Popen(cmd, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        code = process.wait()
    raise typer.Exit(code)
