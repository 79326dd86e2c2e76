"""Small helpers over diffusers' hook registry (`diffusers.hooks.HookRegistry`): hooks replace a module *instance's*
forward through the registry and are removed cleanly; no class is patched and no forward is edited."""

from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

# Hooks that must stay the outermost on their module (the last registered wraps the others): sequence parallel
# splits a block's tokens before anything else sees them, so a cache hook installed later works on this rank's shard.
OUTERMOST = ("vdiff.sequence_parallel",)


def register(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Install `hook` on `module` under `name`, replacing a hook of that name if one is there; an OUTERMOST hook
    already on the module is moved back outside it."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)
    outer = [(n, registry.get_hook(n)) for n in OUTERMOST if n != name and registry.get_hook(n) is not None]
    for n, _ in outer:
        registry.remove_hook(n, recurse=False)
    registry.register_hook(hook, name)
    for n, h in outer:
        registry.register_hook(h, n)


def remove(module: nn.Module, name: str) -> bool:
    """Remove hooks called `name` from `module` and its children; True if any was there."""
    found = False
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(name) is not None:
            registry.remove_hook(name, recurse=False)
            found = True
    return found


def has_hook(module: nn.Module, name: str) -> bool:
    return any(getattr(sub, "_diffusers_hook", None) is not None and sub._diffusers_hook.get_hook(name) is not None
               for sub in module.modules())
