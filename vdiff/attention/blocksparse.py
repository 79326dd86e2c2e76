"""Shared helpers for block-sparse attention: block grids <-> token masks, FlexAttention BlockMasks, impl choice.

A *block grid* is a BoolTensor [Nq, Nk] over blocks of `block_size` consecutive tokens (the last block may be
partial when L is not a multiple of block_size). The FlexAttention kernel computes every (query, key) pair inside a
selected block, so the token-level set a block grid computes is `expand_blocks(blocks, block_size, L)`.

Used by radial and sliding_tile (static masks, built once per (grid, options, device) and cached), and available to
VMoBA for its per-call block selections.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vdiff.attention.dense import flex_backward_reason, flex_unavailable_reason
from vdiff.attention.registry import BackendUnavailable

IMPLS = ("auto", "fast", "reference")


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def expand_blocks(blocks: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Block grid [Nq, Nk] (or [H, Nq, Nk]) -> token mask [L, L] (or [H, L, L]): True where the kernel computes."""
    out = blocks.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return out[..., :length, :length].contiguous()


def reduce_to_blocks(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token mask [L, L] -> block grid [N, N]: True where any pair of the block is set (the blocks a kernel visits)."""
    length = mask.shape[-1]
    n = num_blocks(length, block_size)
    padded = mask.new_zeros(n * block_size, n * block_size)
    padded[:length, :length] = mask
    return padded.view(n, block_size, n, block_size).any(dim=3).any(dim=1)


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Nq, Nk] bool -> (counts (1, 1, Nq) int32, indices (1, 1, Nq, Nk) int32): selected key blocks first, ascending;
    the tail of each row is padding the kernel never reads."""
    counts = blocks.sum(-1, dtype=torch.int32)[None, None]
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
    return counts, indices


def block_mask_from_blocks(full_blocks: torch.Tensor, block_size: int, length: int, device: torch.device | str,
                           partial_blocks: torch.Tensor | None = None, mask_mod: Callable | None = None):
    """A FlexAttention BlockMask over `length` tokens from block grids [Nq, Nk].

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
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def block_mask_from_mask_mod(mask_mod: Callable, length: int, block_size: int, device: torch.device | str):
    """A FlexAttention BlockMask from a token-level `mask_mod(b, h, q_idx, kv_idx)` (partial blocks evaluate it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=str(device),
                             BLOCK_SIZE=block_size)


def choose_impl(method: str, impl: str, q: torch.Tensor) -> str:
    """'fast' or 'reference' for this call, per `impl` (auto | fast | reference); raises if 'fast' cannot run.

    auto: the fast (FlexAttention) path, except where it cannot run this call: no FlexAttention at all, or a
    call that needs a gradient on a device where compiled Flex has no backward (CPU); then the reference path,
    which computes the same set of (query, key) pairs with an explicit mask + SDPA.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention.impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "reference":
        return "reference"
    reason = flex_unavailable_reason(q.device)
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    if reason is None and needs_grad:
        reason = flex_backward_reason(q.device)
    if reason is None:
        return "fast"
    if impl == "fast":
        raise BackendUnavailable(f"{method} (impl=fast): {reason}; use attention.impl=reference or auto")
    return "reference"


def fast_unavailable_note(device: torch.device | str | None) -> str | None:
    """Why the fast path will not be used for training on `device` (None if it will), for `available()`."""
    reason = flex_unavailable_reason(device)
    if reason is not None:
        return f"fast path unavailable ({reason}); runs the reference path (explicit mask + SDPA)"
    return None
