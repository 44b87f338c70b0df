"""Installing hooks on SGLang internals through its own HookRegistry."""

from __future__ import annotations

from collections.abc import Callable


def install(hooks: list[tuple[str, Callable, str]]) -> None:
    """Register ``(dotted target, hook, "before"|"after"|"around")`` hooks.

    Inside SGLang's ``load_plugins`` the registry applies them once every plugin has
    registered; called directly (a test, a benchmark) they are applied here.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType, _current_plugin_source

    for target, hook, kind in hooks:
        HookRegistry.register(target, hook, HookType(kind))
    if _current_plugin_source.get() is None:
        HookRegistry.apply_hooks()
