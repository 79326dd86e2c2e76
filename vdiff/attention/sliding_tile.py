"""Sliding tile attention (Zhang et al., arXiv 2502.04507), implemented from the paper's algorithm.

The token grid (T, H, W) is cut into tiles of `tile` = (tt, th, tw) tokens; tokens are reordered tile-major (tiles in
(t, h, w) order, tokens inside a tile frame-major) once per forward by the model (`token_order`), so a tile is a
contiguous run of tokens. Every query tile attends the key tiles inside a window of `window` = (wt, wh, ww) *tiles*
around its own tile. Per axis with n tiles and window m (clipped to n), the window covers tiles
[s, s + m) with s = clamp(i - m // 2, 0, n - m): the centre is clamped inside the grid, so every query tile attends
exactly the same number of tiles, min(wt, nt) * min(wh, nh) * min(ww, nw) (an even m reaches one tile further back
than forward).

Grids that are not multiples of the tile: **partial tiles**. The last tile along an axis holds the remainder
(e.g. H = 30, th = 8: tiles of 8, 8, 8, 6 rows). Nothing is padded into the attention: a partial tile is a tile
like the others for the window rule, just with fewer tokens, and the tile count per axis is ceil(size / tile).

Implementations (`attention.impl`), over tile-major tokens (the order the model hands to attention):
    fast       FlexAttention; the BlockMask (blocks of 128 tile-major tokens) is built from tile-level prefix sums:
               blocks fully inside attended tile pairs are *full* blocks (no mask evaluated), blocks that straddle a
               tile boundary are partial and evaluate the exact tile rule per token. So the kernel computes exactly
               the tile pattern, whether or not tiles line up with the 128-token blocks (they do when a tile holds a
               multiple of 128 tokens and the grid is a multiple of the tile).
    gather     query tiles with the same window (the clamped ones at the grid's edges) form one group; each group's
               queries and the tokens of its key tiles are gathered and dense SDPA runs batched over groups with equal
               (query, key) counts: no mask, and partial tiles only make other counts (their own bucket). Any
               device, forward+backward (the backward reruns each chunk's attention backward from the saved log-sum-exp;
               `blocksparse.gather_attention`).
    reference  explicit BoolTensor [L, L] over tile-major tokens + SDPA; any device, forward+backward.
    auto       CPU: gather (inference and training). CUDA: fast, or gather where FlexAttention cannot run.
`sparse_pattern("sliding_tile", grid, tile=..., window=...).mask()` is that set over *frame-major* tokens
(mask_frame_major = mask_tile_major[inv][:, inv] with inv = argsort(perm)).
"""

from __future__ import annotations

import dataclasses

import torch

from vdiff.attention.blocksparse import StaticBlockSparseBackend, method_options
from vdiff.attention.flex import block_mask_from_blocks
from vdiff.attention.gather import GatherPlan, gather_plan
from vdiff.attention.patterns import SparsePattern, register_pattern
from vdiff.attention.registry import register_backend
from vdiff.config import SlidingTileConfig

FLEX_BLOCK = 128  # tokens per FlexAttention block (the kernel's default sparse block)


def tile_options(config: SlidingTileConfig | None = None, **overrides) -> SlidingTileConfig:
    """SlidingTileConfig from a config and/or keyword options (tile, window); checked by SlidingTileConfig."""
    return method_options(SlidingTileConfig, "sliding_tile", config, **overrides)


class TileLayout:
    """Tiles of a grid: tile id of every token (frame-major and tile-major), tile sizes, the tile-major permutation,
    and the tile-level attention matrix allowed[query tile, key tile]."""

    def __init__(self, grid: tuple[int, int, int], opts: SlidingTileConfig):
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"sliding_tile: grid must be (T, H, W) with every entry >= 1, got {grid}")
        self.grid, self.opts = grid, opts
        self.tiles_per_axis = tuple(-(-g // t) for g, t in zip(grid, opts.tile))  # (nt, nh, nw), partial tiles count
        nt, nh, nw = self.tiles_per_axis
        t, h, w = (torch.arange(g) for g in grid)
        tt, th, tw = opts.tile
        # tile id of each frame-major token: (T, H, W) -> (L,)
        self.tile_of_token = ((t // tt)[:, None, None] * nh * nw + (h // th)[None, :, None] * nw
                              + (w // tw)[None, None, :]).flatten()
        self.num_tiles = nt * nh * nw
        self.perm = torch.argsort(self.tile_of_token, stable=True)  # tile-major order; frame-major inside a tile
        self.tile_of_sorted = self.tile_of_token[self.perm]  # (L,) non-decreasing
        self.tile_sizes = torch.bincount(self.tile_of_token, minlength=self.num_tiles)  # (num_tiles,)
        self.allowed = self._allowed()  # (num_tiles, num_tiles)

    def _allowed(self) -> torch.Tensor:
        per_axis = []
        for n, m in zip(self.tiles_per_axis, self.opts.window):
            m = min(m, n)
            i = torch.arange(n)
            start = (i - m // 2).clamp(0, n - m)  # window centre clamped inside the grid
            per_axis.append((i[None, :] >= start[:, None]) & (i[None, :] < start[:, None] + m))  # (n, n) [query, key]
        at, ah, aw = per_axis
        allowed = at[:, None, None, :, None, None] & ah[None, :, None, None, :, None] & aw[None, None, :, None, None, :]
        return allowed.reshape(self.num_tiles, self.num_tiles)

    @property
    def tiles_attended(self) -> int:
        """Key tiles per query tile (the same for every query tile)."""
        return int(torch.tensor([min(m, n) for n, m in zip(self.tiles_per_axis, self.opts.window)]).prod())

    def density(self) -> float:
        sizes = self.tile_sizes.double()
        length = float(sizes.sum())
        return float(sizes @ self.allowed.double() @ sizes) / length**2

    def mask_tile_major(self) -> torch.Tensor:
        """BoolTensor [L, L] over tile-major tokens."""
        tid = self.tile_of_sorted
        return self.allowed[tid[:, None], tid[None, :]]

    def mask_frame_major(self) -> torch.Tensor:
        """BoolTensor [L, L] over frame-major tokens."""
        tid = self.tile_of_token
        return self.allowed[tid[:, None], tid[None, :]]

    def block_grids(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(any, full): BoolTensor [N, N] each over blocks of `block_size` tile-major tokens. any = the block holds
        at least one attended pair; full = every pair of the block is attended."""
        length = self.tile_of_sorted.numel()
        n = -(-length // block_size)
        starts = torch.arange(n) * block_size
        ends = (starts + block_size).clamp(max=length) - 1
        first, last = self.tile_of_sorted[starts], self.tile_of_sorted[ends]  # tile range of each block (contiguous)
        # 2D prefix sums of allowed (tile level); a block pair spans tiles [first_q, last_q] x [first_k, last_k]
        s = torch.zeros(self.num_tiles + 1, self.num_tiles + 1, dtype=torch.long)
        s[1:, 1:] = self.allowed.long().cumsum(0).cumsum(1)
        q0, q1 = first[:, None], last[:, None] + 1
        k0, k1 = first[None, :], last[None, :] + 1
        count = s[q1, k1] - s[q0, k1] - s[q1, k0] + s[q0, k0]  # (N, N) attended tile pairs in the rectangle
        full = count == (q1 - q0) * (k1 - k0)
        return count > 0, full

    def gather_plan(self, device: torch.device | str) -> GatherPlan:
        """The gather path's index tensors: query and key blocks are the tiles (contiguous in tile-major order)."""
        sizes = self.tile_sizes
        return gather_plan(torch.cumsum(sizes, 0) - sizes, sizes, self.allowed, device)

    def block_mask(self, device: torch.device | str):
        return flex_block_mask(self, device)

    def reference_mask(self, device: torch.device | str) -> torch.Tensor:
        return self.mask_tile_major().to(device)


def flex_block_mask(layout: TileLayout, device: torch.device | str, block_size: int = FLEX_BLOCK):
    """FlexAttention BlockMask over tile-major tokens computing exactly the tile pattern."""
    any_blocks, full_blocks = layout.block_grids(block_size)
    tile_of = layout.tile_of_sorted.to(device)
    allowed = layout.allowed.to(device)

    def tile_rule(b, h, q_idx, kv_idx):
        return allowed[tile_of[q_idx], tile_of[kv_idx]]

    return block_mask_from_blocks(full_blocks, block_size, tile_of.numel(), device,
                                  partial_blocks=any_blocks & ~full_blocks, mask_mod=tile_rule)


def _sliding_tile_pattern(grid, *, q=None, k=None, layer=0, **options) -> SparsePattern:
    """Options: tile, window (defaults: `SlidingTileConfig`)."""
    opts = tile_options(**options)
    layout = TileLayout(grid, opts)
    any_blocks, _ = layout.block_grids(FLEX_BLOCK)
    return SparsePattern(
        method="sliding_tile", grid=layout.grid, density=layout.density(), _mask_fn=layout.mask_frame_major,
        info={
            "options": dataclasses.asdict(opts),
            "tiles_per_axis": layout.tiles_per_axis,
            "tiles_attended": layout.tiles_attended,
            "num_tiles": layout.num_tiles,
            "token_order": layout.perm,
            "kernel_block_density": any_blocks.float().mean().item(),
            "note": "mask()/density over frame-major tokens; the fast path runs on tile-major tokens (token_order)",
        },
    )


register_pattern("sliding_tile", _sliding_tile_pattern)


# --------------------------------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------------------------------


class SlidingTileBackend(StaticBlockSparseBackend):
    name = "sliding_tile"
    description = (
        "sliding tile attention (static, tile-major tokens): fast = FlexAttention block mask (GPU; on CPU forward "
        "only, compiled Flex has no backward), gather = SDPA over gathered key tiles, reference = explicit mask + "
        "SDPA (both any device, with backward). impl=auto: CPU gather (inference and training), CUDA fast (gather "
        "where FlexAttention cannot run); impl=fast with a gradient on CPU raises."
    )

    def build_layout(self, grid: tuple[int, int, int], options: SlidingTileConfig) -> TileLayout:
        return TileLayout(grid, options)


register_backend(SlidingTileBackend())
