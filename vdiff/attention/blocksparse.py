"""Static block-sparse attention: the backend base shared by radial and sliding tile, and block-grid helpers.

A *block grid* is a BoolTensor [Nq, Nk] over blocks of `block_size` consecutive tokens (the last block may be
partial when L is not a multiple of block_size). The FlexAttention kernel computes every (query, key) pair inside a
selected block, so the token-level set a block grid computes is `expand_blocks(blocks, block_size, L)`.

A static method's pattern depends only on (grid, options): its `StaticLayout` is built once per pair and cached in the
call's mask cache, and each implementation's artefact (gather plan, FlexAttention BlockMask, reference mask) is built
once per device from it. `StaticBlockSparseBackend.attend` is the whole forward of such a method: choose the
implementation (`vdiff.attention.policy`), fetch that artefact, run the kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from vdiff.attention.dense import sdpa_attention
from vdiff.attention.flex import flex_run
from vdiff.attention.gather import GatherPlan, gather_attention, gather_plan
from vdiff.attention.policy import auto_note, choose_impl, needs_grad
from vdiff.attention.registry import AttentionBackend, AttentionContext, CallInfo
from vdiff.config import AttentionConfig


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


def method_options(cls: type, method: str, config: Any = None, **overrides: Any) -> Any:
    """The options dataclass `cls` of a sparse method: `config` (or the defaults) with `overrides` (None = keep).
    The dataclass checks its own values; an unknown option name raises, listing the known ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(config or cls(), **{k: v for k, v in overrides.items() if v is not None})


class StaticLayout(Protocol):
    """What a static method builds once per (grid, options): the pattern and each implementation's artefact."""

    perm: torch.Tensor | None  # token order the kernels run in (None = frame-major)

    def density(self) -> float: ...

    def gather_plan(self, device: torch.device | str) -> GatherPlan: ...

    def block_mask(self, device: torch.device | str) -> Any: ...  # FlexAttention BlockMask

    def reference_mask(self, device: torch.device | str) -> torch.Tensor: ...  # BoolTensor [L, L]

    def token_mask(self) -> torch.Tensor: ...  # BoolTensor [L, L] over frame-major tokens: the pairs computed


class StaticBlockSparseBackend(AttentionBackend):
    """A sparse method whose mask depends only on (grid, options). Subclasses set `name` (also the AttentionConfig
    field holding the options) and implement `build_layout(grid, options)`."""

    sparse = True

    def build_layout(self, grid: tuple[int, int, int], options: Any) -> StaticLayout:
        raise NotImplementedError

    def options(self, config: AttentionConfig) -> Any:
        return getattr(config, self.name)

    def _key(self, grid, options, what: str, device=None) -> tuple:
        return (self.name, what, tuple(grid), dataclasses.astuple(options), str(device) if device else None)

    def layout(self, ctx: AttentionContext) -> StaticLayout:
        opts = self.options(ctx.config)
        return ctx.mask_cache.get_or_build(self._key(ctx.grid, opts, "layout"),
                                           lambda: self.build_layout(tuple(ctx.grid), opts))

    def implementation_note(self, device: torch.device) -> str:
        return auto_note(device)

    def implementation(self, impl: str, device: torch.device | str = "cpu", needs_grad: bool = False) -> str:
        """The path a call runs: 'fast', 'gather' or 'reference' (vdiff.attention.policy)."""
        return choose_impl(self.name, impl, device, needs_grad)

    def token_order(self, grid: tuple[int, int, int], config: AttentionConfig) -> torch.Tensor | None:
        return self.build_layout(tuple(grid), self.options(config)).perm

    def density(self, ctx: AttentionContext) -> float:
        opts = self.options(ctx.config)
        return ctx.mask_cache.get_or_build(self._key(ctx.grid, opts, "density"), lambda: self.layout(ctx).density())

    def attend(self, q, k, v, ctx):
        """q, k, v: [B, L, H, D] in the layout's token order (the model applied `token_order`) -> [B, L, H, D]."""
        if ctx.key_frames is not None:
            return self.attend_tail(q, k, v, ctx)
        if q.shape[1] != ctx.num_tokens:
            raise ValueError(f"{self.name}: q has {q.shape[1]} tokens but grid {ctx.grid} has {ctx.num_tokens}")
        impl = self.implementation(ctx.config.impl, q.device, needs_grad(q, k, v))
        opts = self.options(ctx.config)
        build = {"gather": lambda: self.layout(ctx).gather_plan(q.device),
                 "fast": lambda: self.layout(ctx).block_mask(q.device),
                 "reference": lambda: self.layout(ctx).reference_mask(q.device)}[impl]
        artefact = ctx.mask_cache.get_or_build(self._key(ctx.grid, opts, impl, q.device), build)
        out = run_impl(impl, q, k, v, artefact)
        # the density is cached per (grid, options) but still costs a first build: only when the call is recorded
        return out, CallInfo(self.density(ctx) if ctx.stats is not None else float("nan"), impl)

    def attend_tail(self, q, k, v, ctx):
        """A block-causal call (`ctx.key_frames` set): keys k, v [B, Lk, H, D] are the attended chunks in order, a
        clip of `key_frames` token frames of the query grid's (H, W), frame-major, the query chunk last; q [B, Lq, H,
        D] are that last chunk's `grid[0]` frames. The pattern is this method's over that clip, its rows of the last
        chunk: the mask the last chunk of a clip of the attended chunks would have (radial's window shrinks with the
        distance between chunks, sliding tile's window is clamped to the clip's last tiles). Built once per
        (key grid, query frames, options) in the mask cache; impl as for a square call."""
        t, h, w = ctx.grid
        key_grid = (int(ctx.key_frames), h, w)
        if (q.shape[1], k.shape[1]) != (t * h * w, key_grid[0] * h * w):
            raise ValueError(f"{self.name}: block-causal call with q of {q.shape[1]} tokens and k of {k.shape[1]}, "
                             f"expected {t * h * w} (grid {ctx.grid}) and {key_grid[0] * h * w} (key grid {key_grid})")
        impl = self.implementation(ctx.config.impl, q.device, needs_grad(q, k, v))
        opts = self.options(ctx.config)
        what = f"tail{t}"
        rows = ctx.mask_cache.get_or_build(self._key(key_grid, opts, what), lambda: self._tail_rows(key_grid, opts, t))
        build = {"gather": lambda: tail_gather_plan(rows, q.device),
                 "fast": lambda: tail_block_mask(rows, q.device),
                 "reference": lambda: rows.to(q.device)}[impl]
        artefact = ctx.mask_cache.get_or_build(self._key(key_grid, opts, f"{what}-{impl}", q.device), build)
        out = run_impl(impl, q, k, v, artefact)
        density = float(rows.float().mean()) if ctx.stats is not None else float("nan")
        return out, CallInfo(density, impl)

    def _tail_rows(self, key_grid: tuple[int, int, int], options: Any, query_frames: int) -> torch.Tensor:
        """The last `query_frames` frames' rows of the pattern over `key_grid`: BoolTensor [Lq, Lk], frame-major."""
        n = query_frames * key_grid[1] * key_grid[2]
        return self.build_layout(key_grid, options).token_mask()[-n:].contiguous()

    def forward(self, q, k, v, ctx):
        return self.attend(q, k, v, ctx)[0]


def run_impl(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, artefact: Any) -> torch.Tensor:
    """Run implementation `impl` with its artefact (gather plan, BlockMask, or boolean mask for reference)."""
    if impl == "gather":
        return gather_attention(q, k, v, artefact)
    if impl == "fast":
        return flex_run(q, k, v, artefact)
    return sdpa_attention(q, k, v, artefact)


def tail_gather_plan(rows: torch.Tensor, device: torch.device | str) -> GatherPlan:
    """The gather path for a token-level pattern rows [Lq, Lk] (queries with the same keys run as one group)."""
    lq, lk = rows.shape
    return gather_plan(torch.arange(lk), torch.ones(lk, dtype=torch.long), rows, device,
                       query_starts=torch.arange(lq), query_sizes=torch.ones(lq, dtype=torch.long))


def tail_block_mask(rows: torch.Tensor, device: torch.device | str, block_size: int = 128):
    """A FlexAttention BlockMask over Lq queries and Lk keys from a token-level pattern rows [Lq, Lk]."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed = rows.to(device)

    def rule(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]

    return create_block_mask(rule, B=None, H=None, Q_LEN=rows.shape[0], KV_LEN=rows.shape[1], device=str(device),
                             BLOCK_SIZE=block_size)
