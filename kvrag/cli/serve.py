"""``kvrag serve``: a real SGLang HTTP server (OpenAI-compatible) with the kvrag plugin."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from kvrag.cli.common import DeviceOption, DtypeOption, console, fail, need
from kvrag.compression import SpecError, parse_spec, split_specs
from kvrag.compression.capabilities import Target, check
from kvrag.engine_plugin import config
from kvrag.engines.device import DeviceError, Placement
from kvrag.engines.device import resolve as resolve_placement
from kvrag.engines.models import ModelNotFoundError, resolve_model
from kvrag.engines.sglang_options import SGLangOptions, parse_sglang_args

EVICTION_POLICIES = ("lru", "lfu", "fifo", "mru", "filo", "priority", "slru", "tlru",
                     "kvrag-cost")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_command(model_path: Path, host: str, port: int, eviction_policy: str,
                   eviction_config: str | None, placement: Placement,
                   options: SGLangOptions, api_key: str | None = None) -> list[str]:
    """The ``sglang.launch_server`` command line for the plugin's backend."""
    device = placement.device
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", host, "--port", str(port), "--device", device.type,
           "--dtype", placement.dtype_name,
           "--attention-backend", "kvrag", "--radix-eviction-policy", eviction_policy,
           # compaction runs between batches and outside CUDA graphs (see engine_plugin)
           "--disable-overlap-schedule", "--disable-cuda-graph"]
    if device.type == "cuda" and device.index:
        cmd += ["--base-gpu-id", str(device.index)]
    if device.type == "cpu" and options.mem_fraction_static is None:
        cmd += ["--mem-fraction-static", "0.3"]
    if eviction_config:
        cmd += ["--radix-eviction-policy-config", eviction_config]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + options.flags()


def serve(
    model: Annotated[str, typer.Option(
        help="A packaged model name (smollm2) or a local HF checkpoint dir.")] = "smollm2",
    compression: Annotated[str | None, typer.Option(
        help="Server default, e.g. snapkv:0.5, snapkv[chunk=16]:0.5 (whole 16-token chunks; "
             "see kvrag compare --help for the options), or once:snapkv:0.5 (each corpus "
             "compressed once and shared by its questions; requests then name the corpus with "
             "custom_params.kvrag_span, the documents' [start, end) token span, the corpus "
             "prefix ending where it ends); requests may override it with "
             "custom_params.kvrag_compression (or 'none').")] = None,
    allow_request_specs: Annotated[str | None, typer.Option(help=(
        "Comma-separated specs requests may ask for, or 'any' (default: the server's own "
        "--compression and none). A request asking for another is refused with the list."
    ))] = None,
    eviction_policy: Annotated[str, typer.Option(
        help=f"Radix-cache eviction: {', '.join(EVICTION_POLICIES)}.")] = "kvrag-cost",
    eviction_config: Annotated[str | None, typer.Option(
        help='JSON options of the policy; kvrag-cost takes '
             '\'{"partial": true, "ghosts": 4096}\' (the defaults).')] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 30000,
    api_key: Annotated[str | None, typer.Option(
        envvar="KVRAG_API_KEY", help="Key clients must send (Authorization: Bearer KEY).")
    ] = None,
    allow_unauthenticated: Annotated[bool, typer.Option(
        "--allow-unauthenticated",
        help="Listen on a non-loopback address without --api-key.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    context_length: Annotated[int | None, typer.Option(
        min=1, help="SGLang --context-length (default: the model's).")] = None,
    max_total_tokens: Annotated[int | None, typer.Option(
        min=64, help="KV pool size in tokens (default: SGLang's, from memory).")] = None,
    mem_fraction_static: Annotated[float | None, typer.Option(
        min=0.01, max=0.99, help="SGLang --mem-fraction-static (default: 0.3 on a CPU, "
                                 "SGLang's on a GPU).")] = None,
    tp_size: Annotated[int | None, typer.Option(
        min=1, help="SGLang tensor-parallel size (GPUs per model copy).")] = None,
    sglang_arg: Annotated[list[str] | None, typer.Option(help=(
        "Any other SGLang server option as KEY=VALUE, passed unchanged; repeatable."))] = None,
) -> None:
    """Serve MODEL with compressed-KV attention and a cost-aware radix cache.

    The OpenAI-compatible API is at http://HOST:PORT/v1. Each request's compression can
    be set with extra_body={"custom_params": {"kvrag_compression": "snapkv:0.75"}}, or,
    behind sglang-router (which drops custom_params), with the same object in the
    request's extra_key as 'kvrag:' + JSON (kvrag compare --engine sglang-url does so).
    For several workers, start one kvrag serve per device with the same --api-key and put
    python -m sglang_router.launch_router --worker-urls ... --api-key KEY in front.
    SIGTERM or Ctrl-C stops the SGLang server and its worker processes.
    """
    need("sglang", "kvrag serve")
    if eviction_policy not in EVICTION_POLICIES:
        fail(f"unknown eviction policy {eviction_policy!r}; use one of "
             f"{', '.join(EVICTION_POLICIES)}")
    if host not in LOOPBACK and not api_key and not allow_unauthenticated:
        fail(f"--host {host} accepts requests from other machines: set --api-key (or "
             "KVRAG_API_KEY), or pass --allow-unauthenticated to serve without one")
    try:
        allowed = _allowed_specs(allow_request_specs, compression)
        if compression:
            check(parse_spec(compression), Target.PLUGIN)
        placement = resolve_placement(device, dtype)
        options = SGLangOptions(context_length, max_total_tokens, mem_fraction_static,
                                tp_size, parse_sglang_args(sglang_arg or []))
        model_path = resolve_model(model, console)
    except (SpecError, ModelNotFoundError, DeviceError, ValueError) as e:
        fail(str(e))
    cmd = server_command(model_path, host, port, eviction_policy, eviction_config,
                         placement, options, api_key)
    env = os.environ | {config.ENV_COMPRESSION: compression or "none",
                        config.ENV_ALLOWED: allowed}
    console.print(f"Serving {model} on http://{host}:{port}/v1 ({placement.device}, "
                  f"{placement.dtype_name}; compression {compression or 'none'}; requests may "
                  f"ask for {allowed or 'any spec'}; eviction {eviction_policy})", markup=False)
    raise typer.Exit(_run_server(cmd, env))


def _allowed_specs(allow: str | None, compression: str | None) -> str:
    """The ``KVRAG_ALLOWED_REQUEST_SPECS`` value: '' for any, else checked spec names."""
    if allow is not None and allow.strip().lower() == "any":
        return ""
    items = split_specs(allow) if allow else [compression or "none", "none"]
    names = []
    for item in items:
        if item.lower() == "none":
            names.append("none")
            continue
        spec = parse_spec(item)
        check(spec, Target.PLUGIN)
        names.append(spec.name)
    return ",".join(dict.fromkeys(names))


def _run_server(cmd: list[str], env: dict[str, str]) -> int:
    """Run the server in its own process group until it exits or this process is told to
    stop; then stop the whole group (SGLang's scheduler and detokenizer are its children)."""
    process = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return process.wait()
    except KeyboardInterrupt:
        _stop_group(process)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # workers left behind by the server
