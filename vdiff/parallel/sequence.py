"""Ulysses sequence parallel: the tokens of one sample are split across N ranks; around attention an all-to-all
swaps the split from tokens to heads, so each rank attends over the FULL sequence for H/N heads (any backend, sparse
masks unchanged, since the backend sees the whole token grid), then a second all-to-all swaps back.

    x_BLD         -> split(x)       -> [B, L/N, D]            (entering the first block, after the token reorder)
    q, k, v       -> gather(q,k,v)  -> [B, L, H/N, Dh]        (all-to-all, inside `vdiff.attention.dispatch`)
    out           -> scatter(out)   -> [B, L/N, H, Dh]        (the inverse all-to-all)
    x_BLD local   -> all_gather(x)  -> [B, L, D]              (entering the output head's norm_out)

The model knows nothing of it: `apply_sequence_parallel(model, sp)` installs hooks from outside. Each block's hook
hands the block its shard of the RoPE rows and of per-token modulation and puts `sp` in the block's attention
context; the first block's hook also splits the tokens; a hook on `norm_out` gathers them before the output head.

Gradients: every rank of a group computes the same loss on the gathered output; `all_gather`'s backward sums the
gradient of all N copies, so each rank's parameter gradient is N x its share and the data-parallel mean over all
ranks (DDP / DeepSpeed divide by world size) is exactly the gradient of the mean loss per sample group.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.hooks import ModelHook

from vdiff.cache import hooks

HOOK_NAME = "vdiff.sequence_parallel"


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """All-to-all over dim 0 (size N, one chunk per rank)."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None  # all-to-all over equal chunks is its own adjoint


class _AllGather(torch.autograd.Function):
    """Concatenate the ranks' chunks along `dim`; backward sums the gradient over ranks and keeps the local chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(ctx.world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.world, dim=ctx.dim)[ctx.rank].contiguous(), None, None


class SequenceParallel:
    """Ulysses sequence parallel over a process group of N ranks that all hold the same sample.

    Installed on a model with `apply_sequence_parallel(model, sp)`. Requires L % N == 0 and heads % N == 0.
    """

    def __init__(self, group=None):
        if not dist.is_initialized():
            raise RuntimeError("SequenceParallel needs torch.distributed to be initialised (torchrun)")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"

    def check(self, num_tokens: int, num_heads: int) -> None:
        """Raise if the sequence or the heads do not split evenly over the group."""
        if num_tokens % self.size:
            raise ValueError(f"sequence parallel: {num_tokens} tokens do not split over train.sequence_parallel="
                             f"{self.size} ranks; choose a size that divides the token count")
        if num_heads % self.size:
            raise ValueError(f"sequence parallel: {num_heads} attention heads do not split over "
                             f"train.sequence_parallel={self.size} ranks; it must divide num_attention_heads")

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of `x` along `dim` (x is the same on every rank; the backward needs no communication)."""
        if x.shape[dim] % self.size:
            raise ValueError(
                f"sequence parallel: dim {dim} of size {x.shape[dim]} does not split over {self.size} ranks"
            )
        return x.chunk(self.size, dim=dim)[self.rank]

    def all_gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Concatenate every rank's chunk along `dim` (autograd: the gradient is summed over ranks)."""
        return _AllGather.apply(x, dim, self.group)

    def gather(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """[B, L/N, H, D] x 3 -> [B, L, H/N, D] x 3 (all-to-all: tokens gathered, heads scattered)."""
        return tuple(self._seq_to_heads(t) for t in (q, k, v))

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        """[B, L, H/N, D] -> [B, L/N, H, D]: the inverse of `gather`."""
        n = self.size
        b, seq, h_local, d = out.shape
        x = out.reshape(b, n, seq // n, h_local, d).permute(1, 0, 2, 3, 4)  # (N [token chunk], B, L/N, H/N, D)
        x = _AllToAll.apply(x, self.group)  # (N [head chunk], B, L/N, H/N, D)
        return x.permute(1, 2, 0, 3, 4).reshape(b, seq // n, n * h_local, d)  # (B, L/N, H, D)

    def _seq_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        n = self.size
        b, seq_local, h, d = t.shape
        if h % n:
            raise ValueError(f"sequence parallel: {h} heads do not split over {n} ranks")
        x = t.reshape(b, seq_local, n, h // n, d).permute(2, 0, 1, 3, 4)  # (N [head chunk], B, L/N, H/N, D)
        x = _AllToAll.apply(x, self.group)  # (N [token chunk], B, L/N, H/N, D)
        return x.permute(1, 0, 2, 3, 4).reshape(b, n * seq_local, h // n, d)  # (B, L, H/N, D)


def sequence_parallel_groups(size: int) -> tuple[SequenceParallel | None, int, int]:
    """Split the world into groups of `size` consecutive ranks. Returns (this rank's SequenceParallel or None when
    size == 1, data-parallel rank, data-parallel world size). Ranks of one group read the same samples."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if size < 1 or world % size:
        raise ValueError(f"train.sequence_parallel={size} must be >= 1 and divide the number of processes ({world})")
    if size == 1:
        return None, rank, world
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))  # every rank must create every group
        if start <= rank < start + size:
            mine = group
    return SequenceParallel(mine), rank // size, world // size


# --------------------------------------------------------------------------------------------------------------------
# Hooks: sequence parallel applied to a VideoDiT from outside
# --------------------------------------------------------------------------------------------------------------------


class _BlockShardHook(ModelHook):
    """Runs a block on this rank's shard: splits the tokens entering the first block, and for every block the RoPE
    rows and per-token modulation; the block's attention context carries `sp` (dispatch all-to-alls around it)."""

    def __init__(self, sp: SequenceParallel, heads: int, first: bool):
        super().__init__()
        self.sp, self.heads, self.first = sp, heads, first

    def pre_forward(self, module: nn.Module, x: torch.Tensor, **kwargs):
        sp, ctx = self.sp, kwargs["ctx"]
        if self.first:
            sp.check(x.shape[1], self.heads)
            x = sp.split(x, 1)  # (B, L/N, D)
        cos, sin = kwargs["rope"]
        kwargs["rope"] = (sp.split(cos, 0), sp.split(sin, 0))  # (L/N, 1, Dh/2) each
        if kwargs["temb"].ndim == 4:
            kwargs["temb"] = sp.split(kwargs["temb"], 1)  # (B, L/N, 6, D)
        kwargs["ctx"] = dataclasses.replace(ctx, sequence_parallel=sp)
        return (x,), kwargs


class _GatherHook(ModelHook):
    """Gathers every rank's tokens entering the module (the output head's norm): (B, L/N, D) -> (B, L, D)."""

    def __init__(self, sp: SequenceParallel):
        super().__init__()
        self.sp = sp

    def pre_forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs):
        return (self.sp.all_gather(x, 1), *args), kwargs


def apply_sequence_parallel(model: nn.Module, sp: SequenceParallel) -> None:
    """Run `model` (a VideoDiT) Ulysses-parallel over `sp`'s group: every rank of the group passes the same inputs
    and gets the same output. Install before wrapping the model (DDP / DeepSpeed) and after copying it (EMA)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0 or not hasattr(model, "norm_out"):
        raise TypeError("apply_sequence_parallel needs a VideoDiT (model.blocks, model.norm_out)")
    heads = model.config.num_attention_heads
    for i, block in enumerate(blocks):
        hooks.register(block, _BlockShardHook(sp, heads, first=i == 0), HOOK_NAME)
    hooks.register(model.norm_out, _GatherHook(sp), HOOK_NAME)


def remove_sequence_parallel(model: nn.Module) -> bool:
    return hooks.remove(model, HOOK_NAME)
