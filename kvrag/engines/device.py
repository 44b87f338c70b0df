"""``--device`` and ``--dtype``: what a run computes on, resolved once and checked early.

``auto`` picks the first CUDA device when one is visible, else the CPU; dtype ``auto`` is
bfloat16 on a CUDA device that supports it (float16 on one that does not) and float32
on a CPU, where half precision is slow and SDPA's reference kernels run in float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEVICES = "auto, cpu, cuda, cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A device or dtype that this machine cannot provide, or a misspelt one."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(name for name, dt in DTYPES.items() if dt == self.dtype)

    def to_json(self) -> dict:
        return {"device": str(self.device), "dtype": self.dtype_name}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise DeviceError(f"unknown device {device!r}; use one of {DEVICES}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA device is visible here (torch sees none); "
                          "use --device cpu or auto")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                          f"are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    """The device and dtype a run uses, or a ``DeviceError`` that says what is allowed."""
    where = resolve_device(device)
    if dtype == "auto":
        if where.type != "cuda":
            return Placement(where, torch.float32)
        bf16 = torch.cuda.is_bf16_supported()
        return Placement(where, torch.bfloat16 if bf16 else torch.float16)
    if dtype not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return Placement(where, DTYPES[dtype])
