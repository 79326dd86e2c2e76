"""Dense attention kernels: sdpa (always), flex (FlexAttention, compiled), xformers (CUDA), flash (flash_attn, CUDA).

xformers and flash_attn are imported only when their kernel runs (or is checked on a CUDA device), never at import.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from vdiff.attention.flex import flex_backward_reason, flex_run, flex_unavailable_reason, is_cuda
from vdiff.attention.registry import AttentionBackend, BackendUnavailable, register_backend
from vdiff.runtime import first_line


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, H, D] SDPA (optionally with a boolean mask [L, S] or [H, L, S], True = attend) -> [B, L, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class SDPABackend(AttentionBackend):
    name = "sdpa"
    description = "torch scaled_dot_product_attention (flash / cuDNN / memory-efficient on GPU, math on CPU)"

    def forward(self, q, k, v, ctx):
        return sdpa_attention(q, k, v)


class FlexBackend(AttentionBackend):
    name = "flex"
    description = "FlexAttention (torch.compile), dense"

    def unavailable_reason(self, device=None):
        return flex_unavailable_reason(device)

    def backward_reason(self, device=None):
        return flex_backward_reason(device)

    def forward(self, q, k, v, ctx):
        return flex_run(q, k, v)


_KERNEL_PROBED: dict[tuple[str, str], str | None] = {}  # (backend, device) -> why its kernels do not run, or None


def _kernel_probe(name: str, device: str, call) -> str | None:
    """None when `call(q)` - one tiny fp16 attention through the backend's library - runs on `device`, else why not.
    A wheel built for another torch or Python imports but loads none of its C++/CUDA operators, and every call then
    raises (xformers 0.0.35 built for torch 2.10 / Python 3.10 under torch 2.11 / Python 3.12: "No operator
    found"). Probed once per (backend, device)."""
    if (name, device) not in _KERNEL_PROBED:
        try:
            call(torch.randn(1, 8, 1, 64, device=device, dtype=torch.float16))  # [B, L, H, D]
            _KERNEL_PROBED[name, device] = None
        except Exception as err:
            _KERNEL_PROBED[name, device] = (f"{name} imports but its kernels do not run on {device} "
                                            f"({first_line(err)}); "
                                            f"install a wheel built for this torch and Python")
    return _KERNEL_PROBED[name, device]


class XFormersBackend(AttentionBackend):
    name = "xformers"
    description = "xformers memory_efficient_attention (CUDA only)"

    def unavailable_reason(self, device=None):
        if not is_cuda(device):
            return "xformers kernels need a CUDA device (this is CPU)"
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed (the CUDA extra: pip install 'vdiff[cuda]')"
        try:
            import xformers.ops
        except Exception as err:  # a wheel built for another torch/CUDA fails here
            return f"xformers does not import: {err}"
        return _kernel_probe("xformers", str(device or "cuda"),
                             lambda q: xformers.ops.memory_efficient_attention(q, q, q))

    def forward(self, q, k, v, ctx):
        import xformers.ops as xops

        # xformers takes [B, M, H, K], the same layout as ours
        return xops.memory_efficient_attention(q, k, v)


class FlashBackend(AttentionBackend):
    name = "flash"
    description = "flash_attn.flash_attn_func (CUDA, fp16/bf16)"

    def unavailable_reason(self, device=None):
        if not is_cuda(device):
            return "flash_attn needs a CUDA device (this is CPU)"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not installed"
        try:
            from flash_attn import flash_attn_func
        except Exception as err:  # a wheel built for another torch/CUDA fails here
            return f"flash_attn does not import: {err}"
        return _kernel_probe("flash_attn", str(device or "cuda"), lambda q: flash_attn_func(q, q, q))

    def forward(self, q, k, v, ctx):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise BackendUnavailable(f"flash: flash_attn runs fp16/bf16 only, got {q.dtype}")
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, softmax_scale=1.0 / math.sqrt(q.shape[-1]))


for _backend in (SDPABackend(), FlexBackend(), XFormersBackend(), FlashBackend()):
    register_backend(_backend)


def reference_attention(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d)) v written out, for tests: [B, L, H, D] (+ bool mask [L, S] or [H, L, S])."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    scores = torch.einsum("blhd,bshd->bhls", q64, k64) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    out = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), v64)
    return out


__all__ = ["reference_attention", "sdpa_attention"]
