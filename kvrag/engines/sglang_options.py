"""SGLang's own settings, shared by ``kvrag serve`` and ``compare --engine sglang``.

None keeps SGLang's default (or kvrag's CPU one, where SGLang has none that runs on a
CPU). Anything else SGLang takes goes through ``--sglang-arg KEY=VALUE`` unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

NAMED = ("context_length", "max_total_tokens", "mem_fraction_static", "tp_size")


@dataclass(frozen=True)
class SGLangOptions:
    """The options both commands name, plus any others as (KEY, VALUE) strings."""

    context_length: int | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    tp_size: int | None = None
    extra: tuple[tuple[str, str], ...] = ()  # --sglang-arg KEY=VALUE, passed unchanged

    def to_json(self) -> dict:
        """The options set, as ``run.json`` records them (SGLang's defaults left out)."""
        named = {name: getattr(self, name) for name in NAMED if getattr(self, name) is not None}
        return named | ({"sglang_args": dict(self.extra)} if self.extra else {})

    def flags(self) -> list[str]:
        """Command-line flags of ``sglang.launch_server``."""
        cmd: list[str] = []
        for name in NAMED:
            value = getattr(self, name)
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        for key, value in self.extra:
            cmd += [f"--{key}"] + ([value] if value != "" else [])
        return cmd

    def engine_kwargs(self) -> dict:
        """Keyword arguments of an in-process ``sglang.Engine``: a VALUE that parses as JSON
        (a number, true/false) is passed as that, else as the string; ``KEY=`` is True."""
        from sglang.srt.server_args import ServerArgs

        known = set(ServerArgs.__annotations__)  # a msgspec struct in 0.5.23, not a dataclass
        kwargs = {name: getattr(self, name) for name in NAMED if getattr(self, name) is not None}
        for key, value in self.extra:
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"--sglang-arg {key}: SGLang has no option --{key}")
            try:
                kwargs[name] = json.loads(value) if value != "" else True
            except json.JSONDecodeError:
                kwargs[name] = value
        return kwargs


def parse_sglang_args(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` (or ``KEY=`` for a bare flag) items; KEY without its leading dashes."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"--sglang-arg {item!r}: use KEY=VALUE, e.g. "
                             "--sglang-arg chunked-prefill-size=4096 (KEY= for a bare flag)")
        out.append((key, value))
    return tuple(out)


