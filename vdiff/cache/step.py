"""Step cache (first-block cache, TeaCache-style residual reuse): skip most of the network on steps where its input
barely changed. Two indicators (`StepCacheConfig.indicator`):

"first_block" (default, diffusers' FirstBlockCache): every step runs the first block. Its residual r = block0(x) - x
is compared with the residual of the last step that ran the whole network:

    change = mean|r - r_last| / mean|r_last|

If change <= threshold, blocks 1..N-1 are skipped and the stored tail residual (their contribution at the last full
step: out_last - block0_out_last) is added instead; otherwise every block runs and the stored residuals are
refreshed. Approximate: higher thresholds skip more steps and drift further from the uncached video, so every
setting is reported with its speed-up and its error (bench/cache.py). TeaCache reports ~2x on Wan2.1 at 0.08 on
its own (timestep-embedding) indicator; the first-block residual indicator here is diffusers' FirstBlockCache.

"modulated_input" (TeaCache's indicator, without its fitted rescaling polynomial): nothing runs before the decision.
The first block's timestep-modulated input m = norm1(x) * (1 + scale) + shift is compared with m at the previous
step, and the relative changes mean|m - m_prev| / mean|m_prev| are summed over the steps since the last full step;
while the sum stays <= threshold, EVERY block is skipped and the stored residual of the whole stack (out_last -
x_last) is added to x. A skipped step then costs only the embeddings and the output head, so fewer skips buy the
same speed-up on a shallow model (on the 4-block bundled model a first-block skip still pays a quarter of a step).

    apply_step_cache(model, StepCacheConfig(threshold=0.08))
    apply_step_cache(model, StepCacheConfig(threshold=0.1, indicator="modulated_input"))
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
INDICATORS = ("first_block", "modulated_input")


@dataclass
class StepCacheConfig:
    """Skip blocks 1..N-1 when the first block's residual changed by at most `threshold` (relative L1); with
    indicator="modulated_input", skip every block while the summed change of block 0's modulated input stays
    <= `threshold`."""

    name: ClassVar[str] = "step"
    target: ClassVar[str] = "transformer"
    threshold: float = 0.08
    warmup_steps: int = 1  # the first steps always run the whole network
    max_consecutive_skips: int | None = None  # force a full step after this many skips in a row (None: no limit)
    indicator: str = "first_block"  # or "modulated_input" (TeaCache: decide before any block, skip them all)

    def __post_init__(self) -> None:
        if self.indicator not in INDICATORS:
            raise ValueError(f"StepCacheConfig.indicator must be one of {INDICATORS}, got {self.indicator!r}")
        if self.threshold < 0:
            raise ValueError(f"StepCacheConfig.threshold must be >= 0, got {self.threshold}")
        if self.warmup_steps < 1:
            raise ValueError(f"StepCacheConfig.warmup_steps must be >= 1 (the first step has nothing to reuse), "
                             f"got {self.warmup_steps}")
        if self.max_consecutive_skips is not None and self.max_consecutive_skips < 1:
            raise ValueError(f"StepCacheConfig.max_consecutive_skips must be >= 1 or None, "
                             f"got {self.max_consecutive_skips}")


class _StepState:
    def __init__(self) -> None:
        self.skip = False  # decided by the head block for the current forward
        self.head_residual: torch.Tensor | None = None  # block0(x) - x at the last full step
        self.head_out: torch.Tensor | None = None  # block0(x) at the current full step
        self.tail_residual: torch.Tensor | None = None  # out - block0(x) at the last full step
        self.consecutive = 0
        # modulated_input indicator
        self.modulated: torch.Tensor | None = None  # block 0's modulated input at the previous step
        self.accumulated = 0.0  # summed relative change since the last full step
        self.stack_input: torch.Tensor | None = None  # x entering block 0 at the current full step
        self.stack_residual: torch.Tensor | None = None  # out - x over all blocks at the last full step


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


def _step_of(kwargs: dict) -> int | None:
    """The denoising step index from a block call's AttentionContext (blocks are called with keyword arguments)."""
    return getattr(kwargs.get("ctx"), "step", None)


def _may_skip(st: _StepState, cfg: StepCacheConfig, step: int | None) -> bool:
    """Past the warm-up, and the current run of skips below its limit."""
    return step is not None and step >= cfg.warmup_steps and \
        (cfg.max_consecutive_skips is None or st.consecutive < cfg.max_consecutive_skips)


def _relative_change(call: CacheCall, new: torch.Tensor, old: torch.Tensor) -> float:
    """mean|new - old| / mean|old|, recorded in the call's stats ("changes"). Under parallel generation the sums
    are taken over every rank's share (`call.relative_change`: the CFG branches, the Ulysses shards without padding),
    so all ranks see the one-process value and make the same skip decision (a split decision would hang Ulysses)."""
    if call.relative_change is not None:
        change = call.relative_change(new, old)
    else:
        change = ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()
    call.stats.setdefault("step", {}).setdefault("changes", []).append(round(change, 6))
    return change


def _decide(call: CacheCall, st: _StepState, skip: bool) -> None:
    """Apply a decision: the tail hooks' flag, the run length, counts and the per-forward pattern (F = full,
    S = skipped, in call order)."""
    st.skip = skip
    st.consecutive = st.consecutive + 1 if skip else 0
    call.count("step", "skipped" if skip else "computed")
    stats = call.stats.setdefault("step", {})
    stats["pattern"] = stats.get("pattern", "") + ("S" if skip else "F")


class _HeadBlockHook(ModelHook):
    def __init__(self, shared: _Shared):
        super().__init__()
        self.shared = shared

    def new_forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs):
        got = self.shared.state()
        if got is not None and got[2].indicator == "modulated_input":
            return self._modulated_input(module, x, got, *args, **kwargs)
        out = self.fn_ref.original_forward(x, *args, **kwargs)  # (B, L, D)
        if got is None:
            return out
        call, st, cfg = got
        residual = out - x
        skip = False
        if st.head_residual is not None and st.tail_residual is not None and _may_skip(st, cfg, _step_of(kwargs)) \
                and st.head_residual.shape == residual.shape:
            skip = _relative_change(call, residual, st.head_residual) <= cfg.threshold
        _decide(call, st, skip)
        if skip:
            return out + st.tail_residual
        st.head_residual, st.head_out = residual, out
        return out

    def _modulated_input(self, module: nn.Module, x: torch.Tensor, got, *args, **kwargs):
        call, st, cfg = got
        m = module.modulated_input(x, kwargs["temb"])  # (B, L, D) fp32
        skip = False
        if st.modulated is not None and st.modulated.shape == m.shape:
            change = _relative_change(call, m, st.modulated)
            if st.stack_residual is not None and _may_skip(st, cfg, _step_of(kwargs)) \
                    and st.stack_residual.shape == x.shape:
                skip = st.accumulated + change <= cfg.threshold
            st.accumulated = st.accumulated + change if skip else 0.0
        st.modulated = m
        _decide(call, st, skip)
        if skip:
            return x + st.stack_residual  # the tail hooks pass it through
        st.stack_input = x
        return module.forward_modulated(x, m, *args, **kwargs)  # the block from m: norm1 is not computed twice


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
            st, cfg = got[1], got[2]
            if cfg.indicator == "modulated_input":
                st.stack_residual = out - st.stack_input
            else:
                st.tail_residual = out - st.head_out
        return out


def apply_step_cache(model: nn.Module, config: StepCacheConfig | None = None) -> None:
    """Install the step cache on a VideoDiT (needs at least 2 blocks)."""
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
