"""Sliding tile attention (Zhang et al., arXiv 2502.04507), implemented from the paper's algorithm.

The token grid (T, H, W) is cut into tiles of `tile` = (tt, th, tw) tokens; tokens are reordered tile-major (tiles in
(t, h, w) order, tokens inside a tile frame-major) once per forward by the model (`token_order`), so a tile is a
contiguous run of tokens. Every query tile attends the key tiles inside a window of `window` = (wt, wh, ww) *tiles*
around its own tile. Per axis with n tiles and window m (clipped to n), the window covers tiles
[s, s + m) with s = clamp(i - m // 2, 0, n - m): the centre is clamped inside the grid, so every query tile attends
exactly the same number of tiles, min(wt, nt) * min(wh, nh) * min(ww, nw) (an even m reaches one tile further back
than forward).

Grids that are not multiples of the tile: **partial tiles**. The last tile along an axis holds the remainder
(e.g. H = 30, th = 8: tiles of 8, 8, 8, 6 rows). A partial tile is a tile like the others for the window rule, just
with fewer tokens, and the tile count per axis is ceil(size / tile); only the fast path pads (whole kernel blocks per
class of tiles, below), and padding never enters the result.

Implementations (`attention.impl`), over tile-major tokens (the order the model hands to attention):
    fast       FlexAttention over *packed* layouts of the queries and of the keys (`FlexTilePlan`): tiles whose
               rows of the tile matrix are equal (the same key tiles: the clamped windows at the grid's edges) form
               a query class, tiles with equal columns a key class; each class runs in whole kernel blocks of its own,
               and the remainders (< one block, e.g. of partial tiles) share blocks chosen to attend nearly the same
               tiles; padding keys are masked, padding query rows dropped. So partial tiles do not make blocks
               straddle tiles at random: blocks visited x block area ~ density x L^2 (Wan 480p, tile (6, 8, 8),
               window (3, 3, 3): 0.277 vs density 0.272; in plain tile-major order 0.335). Blocks inside one class
               pair are *full* (no mask evaluated); the others evaluate the exact tile rule per token.
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
from vdiff.attention.flex import GatheredBlockMask, block_mask_from_blocks
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
        self._plans: dict[int, FlexTilePlan] = {}

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

    def gather_plan(self, device: torch.device | str) -> GatherPlan:
        """The gather path's index tensors: query and key blocks are the tiles (contiguous in tile-major order)."""
        sizes = self.tile_sizes
        return gather_plan(torch.cumsum(sizes, 0) - sizes, sizes, self.allowed, device)

    def flex_plan(self, block_size: int = FLEX_BLOCK) -> FlexTilePlan:
        """The fast path's packed layouts and block grids (device-independent; `block_mask` moves them)."""
        if block_size not in self._plans:
            self._plans[block_size] = FlexTilePlan(self, block_size)
        return self._plans[block_size]

    def block_mask(self, device: torch.device | str, block_size: int = FLEX_BLOCK) -> GatheredBlockMask:
        return self.flex_plan(block_size).block_mask(device)

    def reference_mask(self, device: torch.device | str) -> torch.Tensor:
        return self.mask_tile_major().to(device)

    def token_mask(self) -> torch.Tensor:
        return self.mask_frame_major()


# --------------------------------------------------------------------------------------------------------------------
# Fast path: packed query / key layouts so that kernel blocks do not straddle tiles with different windows
# --------------------------------------------------------------------------------------------------------------------

BIN_CANDIDATES = 64  # remainders are packed into one of the most recent open shared blocks (bounds the build time)


def _pack(relation: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, block: int) -> torch.Tensor:
    """Token of each position of one side's packed layout: LongTensor [N * block], -1 = padding.

    relation [num_tiles, M]: what each tile of this side attends (queries: rows of `allowed`) or is attended by
    (keys: columns). Tiles with equal rows form a class; classes are laid out in the order of their first tile,
    each in whole blocks of its own tokens; every class's remainder (< block) goes into a shared block at the end,
    the one with room whose set grows least (largest remainders first), else a new one."""
    classes, class_of = torch.unique(relation, dim=0, return_inverse=True)
    num_classes = classes.shape[0]
    first_tile = torch.full((num_classes,), relation.shape[0]).scatter_reduce(
        0, class_of, torch.arange(relation.shape[0]), "amin")
    order = torch.argsort(first_tile[class_of] * relation.shape[0] + torch.arange(relation.shape[0]))  # tiles, by class
    class_sizes = torch.zeros(num_classes, dtype=torch.long).index_add_(0, class_of, sizes)
    tokens = torch.repeat_interleave(starts[order], sizes[order]) + torch.arange(int(sizes.sum())) - \
        torch.repeat_interleave(torch.cumsum(sizes[order], 0) - sizes[order], sizes[order])  # class-major tokens
    class_ends = torch.cumsum(class_sizes[first_tile.argsort()], 0)
    whole, rest = [], []  # token runs: whole blocks of each class, and each class's remainder
    begin = 0
    for c, end in zip(first_tile.argsort().tolist(), class_ends.tolist()):
        cut = end - (end - begin) % block
        whole.append(tokens[begin:cut])
        if cut < end:
            rest.append((end - cut, c, tokens[cut:end]))
        begin = end
    rest.sort(key=lambda r: -r[0])  # stable: equal sizes keep the layout order
    bins: list[list[torch.Tensor]] = []
    room = torch.zeros(0, dtype=torch.long)
    sets = torch.zeros(0, classes.shape[1], dtype=torch.bool)
    for size, c, run in rest:
        recent = torch.arange(max(0, len(bins) - BIN_CANDIDATES), len(bins))
        fits = recent[room[recent] >= size] if len(bins) else recent
        if fits.numel():
            grown = (sets[fits] | classes[c]).sum(1) - sets[fits].sum(1)
            b = int(fits[int(grown.argmin())])
            bins[b].append(run)
            room[b] -= size
            sets[b] |= classes[c]
        else:
            bins.append([run])
            room = torch.cat([room, torch.tensor([block - size])])
            sets = torch.cat([sets, classes[c][None]])
    runs = whole + [torch.cat(b + [torch.full((int(r),), -1)]) for b, r in zip(bins, room.tolist())]
    return torch.cat(runs)


class FlexTilePlan:
    """The fast path's layouts for one TileLayout and kernel block: q_index [Nq * block] / kv_index [Nk * block] (the
    tile-major token at each position, -1 = padding), out_index [L] (each token's position in the query layout),
    and the block grids any / full [Nq, Nk] (full: every pair attended, no padding key). Of the packed layouts
    (`_pack`) and plain tile-major order (better on grids of a few blocks), the one visiting fewer blocks."""

    def __init__(self, layout: TileLayout, block: int):
        sizes = layout.tile_sizes
        starts = torch.cumsum(sizes, 0) - sizes
        self.block, self.length, self.num_tiles = block, int(sizes.sum()), layout.num_tiles
        self.tile_of_sorted = layout.tile_of_sorted
        self.allowed = torch.zeros(layout.num_tiles + 1, layout.num_tiles + 1, dtype=torch.bool)  # + padding tile
        self.allowed[:-1, :-1] = layout.allowed
        plain = torch.cat([torch.arange(self.length), torch.full((-self.length % block,), -1)])
        packed = self._grids(_pack(layout.allowed, starts, sizes, block), _pack(layout.allowed.T, starts, sizes, block))
        tile_major = self._grids(plain, plain)
        best = packed if packed[4].sum() <= tile_major[4].sum() else tile_major
        self.q_index, self.kv_index, self.q_tile, self.kv_tile, self.any, self.full = best
        self.out_index = torch.empty(self.length, dtype=torch.long)
        real = self.q_index >= 0
        self.out_index[self.q_index[real]] = real.nonzero().flatten()

    def _grids(self, q_index: torch.Tensor, kv_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q_index, kv_index, q_tile, kv_tile, any, full) of one pair of layouts."""
        block, tile = self.block, self.tile_of_sorted
        # query padding takes a tile of its own block (the first token's: every block starts with a real token), so
        # its rows attend real keys and leave the block grids unchanged; padding keys get tile `num_tiles`, which
        # nothing attends
        q_tile = tile[q_index.clamp(min=0)].view(-1, block)
        q_tile = torch.where((q_index >= 0).view(-1, block), q_tile, q_tile[:, :1]).flatten()
        kv_tile = torch.where(kv_index >= 0, tile[kv_index.clamp(min=0)], self.num_tiles)
        tiles_q = self._tiles_per_block(q_tile)  # (Nq, num_tiles + 1) tiles present in each block
        tiles_k = self._tiles_per_block(kv_tile)
        pairs = tiles_q @ self.allowed.float() @ tiles_k.T  # attended (query tile, key tile) pairs per block pair
        full = (pairs == tiles_q.sum(1)[:, None] * tiles_k.sum(1)[None, :]) & (tiles_k[:, -1] == 0)[None, :]
        return q_index, kv_index, q_tile, kv_tile, pairs > 0, full

    def _tiles_per_block(self, tile_of_position: torch.Tensor) -> torch.Tensor:
        n = tile_of_position.numel() // self.block
        present = torch.zeros(n, self.num_tiles + 1)
        present[torch.arange(n).repeat_interleave(self.block), tile_of_position] = 1.0
        return present

    def work(self) -> float:
        """Blocks visited x block area / L^2: the kernel's work as a fraction of dense attention over L tokens."""
        return float(self.any.sum()) * self.block**2 / self.length**2

    def block_mask(self, device: torch.device | str) -> GatheredBlockMask:
        q_tile, kv_tile, allowed = (t.to(device) for t in (self.q_tile, self.kv_tile, self.allowed))

        def tile_rule(b, h, q_idx, kv_idx):
            return allowed[q_tile[q_idx], kv_tile[kv_idx]]

        mask = block_mask_from_blocks(self.full, self.block, self.q_index.numel(), device,
                                      partial_blocks=self.any & ~self.full, mask_mod=tile_rule,
                                      kv_length=self.kv_index.numel())
        # padding picks token 0: its keys are masked and its query rows dropped, so it gets no gradient either
        return GatheredBlockMask(mask, self.q_index.clamp(min=0).to(device), self.kv_index.clamp(min=0).to(device),
                                 self.out_index.to(device))


def _sliding_tile_pattern(grid, *, q=None, k=None, layer=0, **options) -> SparsePattern:
    """Options: tile, window (defaults: `SlidingTileConfig`)."""
    opts = tile_options(**options)
    layout = TileLayout(grid, opts)
    plan = layout.flex_plan(FLEX_BLOCK)
    return SparsePattern(
        method="sliding_tile", grid=layout.grid, density=layout.density(), _mask_fn=layout.mask_frame_major,
        info={
            "options": dataclasses.asdict(opts),
            "tiles_per_axis": layout.tiles_per_axis,
            "tiles_attended": layout.tiles_attended,
            "num_tiles": layout.num_tiles,
            "token_order": layout.perm,
            # the fast path's blocks visited x block area / L^2 (what the kernel computes, padding included)
            "kernel_block_density": plan.work(),
            "kernel_blocks": (plan.any.shape[0], plan.any.shape[1], int(plan.any.sum())),  # (Nq, Nk, visited)
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
