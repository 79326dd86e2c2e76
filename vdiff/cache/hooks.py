"""Small helpers over diffusers' hook registry (`diffusers.hooks.HookRegistry`): hooks replace a module *instance's*
forward through the registry and are removed cleanly; no class is patched and no forward is edited."""

from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook


def register(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Install `hook` on `module` under `name`, replacing a hook of that name if one is there."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)
    registry.register_hook(hook, name)


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
