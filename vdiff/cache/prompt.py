"""Prompt cache: an LRU of text embeddings across calls. A server sees the same prompts (and the same empty negative
prompt) over and over; encoding them once is free speed. Keyed by (prompt, encoder max_length); stores each prompt's
tokens up to its last real one and zero-pads back, which is what the encoder returns (padding is zeroed).
Exact up to float rounding of batched vs unbatched encoding.

    apply_prompt_cache(text_encoder, PromptCacheConfig(max_entries=256))
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from vdiff.cache import hooks
from vdiff.cache.context import current_call
from vdiff.models.text import TextEmbeddings

HOOK_NAME = "vdiff.prompt"


@dataclass
class PromptCacheConfig:
    """LRU of per-prompt text embeddings, shared by all calls of a pipeline."""

    name: ClassVar[str] = "prompt"
    target: ClassVar[str] = "text_encoder"
    max_entries: int = 256

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"PromptCacheConfig.max_entries must be >= 1, got {self.max_entries}")


class _PromptCacheHook(ModelHook):
    def __init__(self, config: PromptCacheConfig):
        super().__init__()
        self.config = config
        self._lru: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def new_forward(self, module: nn.Module, prompts: list[str] | str):
        call = current_call()
        if call is not None and not call.active("prompt"):
            return self.fn_ref.original_forward(prompts)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        length = int(getattr(module, "max_length", 0))
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._lock:
            for p in prompts:
                if (p, length) in self._lru:
                    self._lru.move_to_end((p, length))
                    found[p] = self._lru[(p, length)]
        missing = list(dict.fromkeys(p for p in prompts if p not in found))  # unique, in order
        if missing:
            out = self.fn_ref.original_forward(missing)  # embeds (M, S, dim), mask (M, S)
            with self._lock:
                for j, p in enumerate(missing):
                    n = int(out.mask[j].nonzero().max()) + 1 if out.mask[j].any() else 0
                    entry = (out.embeds[j, :n].clone(), out.mask[j].clone())
                    found[p] = self._lru[(p, length)] = entry
                while len(self._lru) > self.config.max_entries:
                    self._lru.popitem(last=False)
        hits = len(prompts) - sum(1 for p in prompts if p in missing)
        with self._lock:
            self.hits += hits
            self.misses += len(prompts) - hits
        if call is not None:
            call.count("prompt", "hits", hits)
            call.count("prompt", "misses", len(prompts) - hits)
        masks = torch.stack([found[p][1] for p in prompts])  # (B, S)
        embeds = masks.new_zeros(*masks.shape, found[prompts[0]][0].shape[-1], dtype=found[prompts[0]][0].dtype)
        for i, p in enumerate(prompts):
            e = found[p][0]
            embeds[i, : e.shape[0]] = e
        return TextEmbeddings(embeds, masks)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()


def apply_prompt_cache(text_encoder: nn.Module, config: PromptCacheConfig | None = None) -> None:
    """Install the prompt LRU on a text encoder whose `forward(list[str]) -> TextEmbeddings`."""
    hooks.register(text_encoder, _PromptCacheHook(config or PromptCacheConfig()), HOOK_NAME)


def remove_prompt_cache(text_encoder: nn.Module) -> bool:
    return hooks.remove(text_encoder, HOOK_NAME)
