"""FlexAttention helpers shared by the dense `flex` kernel and the sparse fast paths: one compiled callable per process,
the capability checks, and BlockMasks built directly from block grids (no L x L mask_mod sweep)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vdiff.attention.registry import BackendUnavailable


def is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


# FlexAttention: one compiled callable per process, shared by the dense kernel and the sparse fast paths, so a test
# session or a server compiles each shape once.
_COMPILED_FLEX = None

# Each (shape, block-mask structure) is one compiled graph. Past torch's recompile limit (8 by default) dynamo would run
# flex_attention eagerly, and eager FlexAttention applies only the mask_mod: a BlockMask built from block lists with
# full blocks (no mask_mod) silently turns into dense attention. The limit is raised for these calls, and reaching it
# fails loudly instead of falling back.
FLEX_RECOMPILE_LIMIT = int(os.environ.get("VDIFF_FLEX_RECOMPILE_LIMIT", "64"))


def compiled_flex_attention() -> Callable:
    """The process's compiled flex_attention, called as flex_attention(q, k, v, block_mask=...). It never runs the
    eager (block-list-ignoring) path: reaching FLEX_RECOMPILE_LIMIT graphs raises with the setting to raise."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _run_compiled


def _run_compiled(q, k, v, block_mask=None):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return _COMPILED_FLEX(q, k, v, block_mask=block_mask)
    except FailOnRecompileLimitHit as err:
        raise RuntimeError(
            f"compiled FlexAttention reached {FLEX_RECOMPILE_LIMIT} graphs (one per query/key shape and block-mask "
            f"structure) in this process; set VDIFF_FLEX_RECOMPILE_LIMIT higher (its eager fallback would ignore "
            f"the block lists)") from err


def flex_unavailable_reason(device: torch.device | str | None) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as err:
        return f"torch {torch.__version__} has no FlexAttention ({err})"
    if is_cuda(device) and importlib.util.find_spec("triton") is None:
        return "FlexAttention on CUDA needs triton, which is not installed"
    return None


def flex_backward_reason(device: torch.device | str | None) -> str | None:
    if not is_cuda(device):
        return ("compiled FlexAttention has no backward on CPU (training on CPU runs sdpa, "
                "or the gather path for sparse methods)")
    return None


def full_block_mask(q_len: int, kv_len: int, device: torch.device | str, block_size: int = 128):
    """A BlockMask with every block full (no mask_mod): dense FlexAttention. Passing `block_mask=None` instead is
    4-8x slower on CPU (measured: 8,192 tokens, 4 heads, d=64: 5.3 s vs 1.3 s)."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    counts = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
    indices = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
                                    BLOCK_SIZE=block_size, seq_lengths=(q_len, kv_len))


@dataclass(frozen=True)
class GatheredBlockMask:
    """A BlockMask over re-laid-out queries and keys (e.g. sliding tile's packed layouts, padded to whole blocks).

    q_index [Lq'] / kv_index [Lk']: the token each query / key position reads; out_index [L]: the query position
    holding each token's output. Padding positions read any token: the mask must exclude padding keys, and padding
    query rows are never read back (so they get no gradient)."""

    block_mask: Any
    q_index: torch.Tensor
    kv_index: torch.Tensor
    out_index: torch.Tensor


def flex_run(q, k, v, block_mask=None) -> torch.Tensor:
    """[B, L, H, D] through compiled FlexAttention with an optional BlockMask (or GatheredBlockMask) -> [B, L, H, D]."""
    if q.requires_grad and torch.is_grad_enabled() and flex_backward_reason(q.device):
        raise BackendUnavailable(f"flex: {flex_backward_reason(q.device)}")
    if not torch.is_grad_enabled():  # inference on leaves that require grad: the CPU kernel refuses those
        q, k, v = q.detach(), k.detach(), v.detach()
    if isinstance(block_mask, GatheredBlockMask):
        # gathering along L of the [B, H, L, D] view writes the contiguous layout the kernel reads in the same copy
        m = block_mask
        q_, k_, v_ = (t.transpose(1, 2).index_select(2, idx).contiguous()
                      for t, idx in ((q, m.q_index), (k, m.kv_index), (v, m.kv_index)))
        out = compiled_flex_attention()(q_, k_, v_, block_mask=m.block_mask)  # [B, H, Lq', D]
        return out.index_select(2, m.out_index).transpose(1, 2)
    if block_mask is None:
        block_mask = full_block_mask(q.shape[1], k.shape[1], q.device)
    # The kernel reads [B, H, L, D]; strided (transposed) inputs run ~2x slower on CPU, so copy once.
    q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = compiled_flex_attention()(q_, k_, v_, block_mask=block_mask)
    return out.transpose(1, 2)


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Nq, Nk] bool -> (counts (1, 1, Nq) int32, indices (1, 1, Nq, Nk) int32): selected key blocks first, ascending;
    the tail of each row is padding the kernel never reads."""
    counts = blocks.sum(-1, dtype=torch.int32)[None, None]
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
    return counts, indices


def block_mask_from_blocks(full_blocks: torch.Tensor, block_size: int, length: int, device: torch.device | str,
                           partial_blocks: torch.Tensor | None = None, mask_mod: Callable | None = None,
                           kv_length: int | None = None):
    """A FlexAttention BlockMask over `length` queries and `kv_length` keys (default: `length`) from block grids
    [Nq, Nk], built on `device` (the block lists are sorted there).

    full_blocks: the kernel computes every pair of these blocks (no mask_mod evaluated).
    partial_blocks (with mask_mod): the kernel evaluates `mask_mod(b, h, q_idx, kv_idx)` per pair in these blocks.
    Tokens past `length` in the last partial block row/column are excluded by the kernel's sequence-length bound.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if (partial_blocks is None) != (mask_mod is None):
        raise ValueError("block_mask_from_blocks: partial_blocks and mask_mod go together")
    full_blocks = full_blocks.to(device=device, dtype=torch.bool)
    partial_blocks = torch.zeros_like(full_blocks) if partial_blocks is None else partial_blocks.to(device, torch.bool)
    full_counts, full_indices = _block_lists(full_blocks)
    counts, indices = _block_lists(partial_blocks)  # separate tensors: aliased inputs break the CPU kernel
    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(length, length if kv_length is None else kv_length))


def block_mask_from_mask_mod(mask_mod: Callable, length: int, block_size: int, device: torch.device | str):
    """A FlexAttention BlockMask from a token-level `mask_mod(b, h, q_idx, kv_idx)` (partial blocks evaluate it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=str(device),
                             BLOCK_SIZE=block_size)
