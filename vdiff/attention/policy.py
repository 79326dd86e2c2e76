"""Which implementation a sparse method runs: one policy and one vocabulary for radial, sliding tile and VMoBA.

`attention.impl` names what the user asks for; `choose_impl` returns the path a call runs, in the same words:

    fast       FlexAttention block-sparse kernels (compiled). Where it cannot run the call (no FlexAttention, or a
               gradient on CPU, where compiled Flex has no backward) it raises `BackendUnavailable` with the reason.
    gather     plain PyTorch over gathered key blocks (radial / sliding tile: dense SDPA per group of query blocks;
               VMoBA: its varlen path); any device, forward and backward.
    reference  an explicit boolean mask over all L x L pairs + SDPA; any device, O(L^2) memory: tests and small grids.
    auto       CPU: gather, for inference and training (AUTO_FAST_ON_CPU: measured faster than compiled Flex there,
               which also has no CPU backward). Elsewhere: fast where FlexAttention can run the call, else gather.
               Never the reference path: at 32k tokens its mask alone is about 1 GiB.
"""

from __future__ import annotations

import torch

from vdiff.attention.flex import flex_backward_reason, flex_unavailable_reason
from vdiff.attention.registry import BackendUnavailable

IMPLS = ("auto", "fast", "gather", "reference")
# impl=auto on CPU: the fast path only if this is set. Measured (README attention section, bench/attention.py):
# compiled Flex on CPU runs at ~0.4x SDPA's speed per computed block for radial / sliding tile, and VMoBA's flex path
# (2 busy cores, grid (8, 32, 32), 4 heads, d=64, top-3) took 1.6-2.3 s against gather's 0.8-2.6 s and dense SDPA's
# ~1.1 s, winning only on the 1D partition, with a 10-25 s compile per shape.
AUTO_FAST_ON_CPU = False


def fast_reason(device: torch.device | str, needs_grad: bool) -> str | None:
    """None if the FlexAttention fast path can run a call on `device` (with a gradient if `needs_grad`), else why."""
    reason = flex_unavailable_reason(device)
    if reason is None and needs_grad:
        reason = flex_backward_reason(device)
    return reason


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate through a call on these inputs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_impl(method: str, impl: str, device: torch.device | str, needs_grad: bool) -> str:
    """'fast', 'gather' or 'reference': the path `method` runs for `impl` on `device` (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"attention.impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl in ("gather", "reference"):
        return impl
    reason = fast_reason(device, needs_grad)
    if impl == "fast":
        if reason is not None:
            raise BackendUnavailable(f"{method} (impl=fast): {reason}; use attention.impl=auto (runs gather where the "
                                     "fast path cannot), gather or reference")
        return "fast"
    on_cpu = torch.device(device).type == "cpu"
    return "fast" if reason is None and (AUTO_FAST_ON_CPU or not on_cpu) else "gather"


def auto_note(device: torch.device | str) -> str:
    """What impl=auto runs on `device`, for inference and for training, and why (for `available()`)."""
    infer, train = choose_impl("", "auto", device, False), choose_impl("", "auto", device, True)
    if torch.device(device).type == "cpu" and not AUTO_FAST_ON_CPU:
        why = "on CPU gather was measured faster than compiled FlexAttention, which has no CPU backward"
    else:
        reason = fast_reason(device, True)
        why = f"fast path unavailable: {reason}" if reason else "FlexAttention block-sparse kernels"
    where = infer if infer == train else f"{infer} (inference), {train} (training)"
    return f"impl=auto runs {where}: {why}"
