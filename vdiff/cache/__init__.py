"""Inference caches as hooks (diffusers' hook registry: per-instance, removable; never an edit to forward).

    name      config               applies to     exact?
    text_kv   TextKVCacheConfig    transformer    yes: text projection + cross-attn K/V once per call
    mask      MaskCacheConfig      transformer    yes: sparse masks / block indices once per (grid, options)
    step      StepCacheConfig      transformer    no:  residual reuse, `threshold`; first-block or TeaCache indicator
    prompt    PromptCacheConfig    text encoder   yes (to float rounding): LRU of prompt embeddings across calls
    causal_kv CausalKVCacheConfig  transformer    yes (commit="clean"): earlier chunks' K/V for long video

    from vdiff.cache import apply_text_kv_cache, TextKVCacheConfig, cache_context
    apply_text_kv_cache(model, TextKVCacheConfig())
    with cache_context():        # one per sampling call (VideoPipeline does this)
        ...
"""

from __future__ import annotations

from typing import Any

from vdiff.cache.causal_kv import CausalKVCacheConfig, CausalKVState, apply_causal_kv_cache, remove_causal_kv_cache
from vdiff.cache.context import CacheCall, cache_context, current_call
from vdiff.cache.mask import MaskCacheConfig, apply_mask_cache, no_mask_cache, remove_mask_cache
from vdiff.cache.prompt import PromptCacheConfig, apply_prompt_cache, remove_prompt_cache
from vdiff.cache.step import StepCacheConfig, apply_step_cache, remove_step_cache
from vdiff.cache.text_kv import TextKVCacheConfig, apply_text_kv_cache, remove_text_kv_cache

CacheConfig = TextKVCacheConfig | MaskCacheConfig | StepCacheConfig | PromptCacheConfig | CausalKVCacheConfig

CACHES: dict[str, tuple[type, Any, Any]] = {
    "text_kv": (TextKVCacheConfig, apply_text_kv_cache, remove_text_kv_cache),
    "mask": (MaskCacheConfig, apply_mask_cache, remove_mask_cache),
    "step": (StepCacheConfig, apply_step_cache, remove_step_cache),
    "prompt": (PromptCacheConfig, apply_prompt_cache, remove_prompt_cache),
    "causal_kv": (CausalKVCacheConfig, apply_causal_kv_cache, remove_causal_kv_cache),
}
CACHE_NAMES = tuple(CACHES)


def cache_config(spec: str | CacheConfig) -> CacheConfig:
    """A cache name ('text_kv', 'mask', 'step', 'prompt') or a config object -> the config object."""
    if isinstance(spec, str):
        if spec not in CACHES:
            raise ValueError(f"cache: unknown cache {spec!r}; known: {list(CACHE_NAMES)}")
        return CACHES[spec][0]()
    if type(spec) not in {c for c, _, _ in CACHES.values()}:
        raise ValueError(f"cache: expected a name in {list(CACHE_NAMES)} or one of their configs, got {spec!r}")
    return spec


def apply_cache(module: Any, config: CacheConfig) -> None:
    """Install the hook of `config` on `module` (the transformer, or the text encoder for `prompt`)."""
    CACHES[config.name][1](module, config)


def remove_cache(module: Any, name: str) -> bool:
    return CACHES[name][2](module)


__all__ = [
    "CACHES", "CACHE_NAMES", "CacheCall", "CacheConfig", "CausalKVCacheConfig", "CausalKVState", "MaskCacheConfig",
    "PromptCacheConfig", "StepCacheConfig",
    "TextKVCacheConfig", "apply_cache", "apply_mask_cache", "apply_prompt_cache", "apply_step_cache",
    "apply_text_kv_cache", "cache_config", "cache_context", "current_call", "no_mask_cache", "remove_cache",
    "remove_mask_cache", "remove_prompt_cache", "remove_step_cache", "remove_text_kv_cache",
]
