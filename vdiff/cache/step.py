"""Step cache (first-block cache, TeaCache-style residual reuse): skip most of the network on steps where its input
barely changed.

Every step runs the first block. Its residual r = block0(x) - x is compared with the residual of the last step
that ran the whole network:

    change = mean|r - r_last| / mean|r_last|

If change <= threshold, blocks 1..N-1 are skipped and the stored tail residual (their contribution at the last full
step: out_last - block0_out_last) is added instead; otherwise every block runs and the stored residuals are
refreshed. Approximate: higher thresholds skip more steps and drift further from the uncached video, so every
setting is reported with its speed-up and its error (bench/cache.py). TeaCache reports ~2x on Wan2.1 at 0.08 on
its own (timestep-embedding) indicator; the first-block residual indicator here is diffusers' FirstBlockCache.

    apply_step_cache(model, StepCacheConfig(threshold=0.08))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from vdiff.cache import hooks
from vdiff.cache.context import CacheCall, current_call

HOOK_NAME = "vdiff.step"


@dataclass
class StepCacheConfig:
    """Skip blocks 1..N-1 when the first block's residual changed by at most `threshold` (relative L1)."""

    name: ClassVar[str] = "step"
    target: ClassVar[str] = "transformer"
    threshold: float = 0.08
    warmup_steps: int = 1  # the first steps always run the whole network
    max_consecutive_skips: int | None = None  # force a full step after this many skips in a row (None: no limit)

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"StepCacheConfig.threshold must be >= 0, got {self.threshold}")
        if self.warmup_steps < 1:
            raise ValueError(f"StepCacheConfig.warmup_steps must be >= 1 (the first step has nothing to reuse), got {self.warmup_steps}")
        if self.max_consecutive_skips is not None and self.max_consecutive_skips < 1:
            raise ValueError(f"StepCacheConfig.max_consecutive_skips must be >= 1 or None, got {self.max_consecutive_skips}")


class _StepState:
    def __init__(self) -> None:
        self.skip = False  # decided by the head block for the current forward
        self.head_residual: torch.Tensor | None = None  # block0(x) - x at the last full step
        self.head_out: torch.Tensor | None = None  # block0(x) at the current full step
        self.tail_residual: torch.Tensor | None = None  # out - block0(x) at the last full step
        self.consecutive = 0


class _Shared:
    """What the head and tail hooks of one model share: the config and the per-call state key."""

    def __init__(self, config: StepCacheConfig):
        self.config = config

    def state(self) -> tuple[CacheCall, _StepState, StepCacheConfig] | None:
        call = current_call()
        if call is None or not call.active("step"):
            return None
        st = call.data.get(self)
        if st is None:
            st = call.data[self] = _StepState()
        return call, st, call.config("step", self.config)


class _HeadBlockHook(ModelHook):
    def __init__(self, shared: _Shared):
        super().__init__()
        self.shared = shared

    def new_forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs):
        out = self.fn_ref.original_forward(x, *args, **kwargs)  # (B, L, D)
        got = self.shared.state()
        if got is None:
            return out
        call, st, cfg = got
        ctx = args[3] if len(args) > 3 else kwargs.get("ctx")
        step = getattr(ctx, "step", None)
        residual = out - x
        skip = False
        if st.head_residual is not None and st.tail_residual is not None and step is not None and step >= cfg.warmup_steps \
                and (cfg.max_consecutive_skips is None or st.consecutive < cfg.max_consecutive_skips) \
                and st.head_residual.shape == residual.shape:
            change = ((residual - st.head_residual).abs().mean() / st.head_residual.abs().mean().clamp_min(1e-12)).item()
            call.stats.setdefault("step", {}).setdefault("changes", []).append(round(change, 6))
            skip = change <= cfg.threshold
        st.skip = skip
        if skip:
            st.consecutive += 1
            call.count("step", "skipped")
            return out + st.tail_residual
        st.consecutive = 0
        st.head_residual, st.head_out = residual, out
        call.count("step", "computed")
        return out


class _TailBlockHook(ModelHook):
    def __init__(self, shared: _Shared, last: bool):
        super().__init__()
        self.shared, self.last = shared, last

    def new_forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs):
        got = self.shared.state()
        if got is not None and got[1].skip:
            return x  # already holds block0 output + cached tail residual
        out = self.fn_ref.original_forward(x, *args, **kwargs)
        if got is not None and self.last:
            st = got[1]
            st.tail_residual = out - st.head_out
        return out


def apply_step_cache(model: nn.Module, config: StepCacheConfig | None = None) -> None:
    """Install the first-block step cache on a VideoDiT (needs at least 2 blocks)."""
    config = config or StepCacheConfig()
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) < 2:
        raise ValueError("step cache needs a model with at least 2 transformer blocks (model.blocks)")
    shared = _Shared(config)
    hooks.register(blocks[0], _HeadBlockHook(shared), HOOK_NAME)
    for i, block in enumerate(blocks[1:], start=1):
        hooks.register(block, _TailBlockHook(shared, last=i == len(blocks) - 1), HOOK_NAME)


def remove_step_cache(model: nn.Module) -> bool:
    return hooks.remove(model, HOOK_NAME)
