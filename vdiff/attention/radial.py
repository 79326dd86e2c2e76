"""Radial attention (Li et al., arXiv 2506.19852), implemented from the paper's algorithm: a static mask whose
compute decays exponentially with temporal distance.

Tokens are frame-major (no reorder): frame i holds tokens [i * P, (i + 1) * P), P = H * W tokens per frame, a token's
index inside its frame is a = h * W + w. For a (query frame i, key frame j) pair with dist = |i - j|:

    sink (option `sink`)          j == 0: the whole pair (every query attends all of frame 0, the Wan setting)
    band                          |a - b| <= window, with
                                      window = P                                                  if dist <= 1
                                      window = max(decay_factor * 2**bitlen(P) / 2**bitlen(dist), block_size)
    temporal split                where the undecayed width u = 2**bitlen(P) / 2**bitlen(dist) is below 128
                                  tokens, only pairs with dist % (128 / u) == 0 are kept (u and 128 are powers of two);
                                  this applies to every non-sink pair, as in the paper's reference code (so with
                                  P < 128 even adjacent frames drop out; dist 0 is always kept).

The kernel computes whole `block_size` x `block_size` blocks of the global (frame-major) token grid. Each frame
pair's token mask is reduced onto that grid: inside one block, a key column is *set* when more than 1/3 of the
block's `block_size` rows (rows outside the frame count as unset) are set for it, and the block is kept when more than
60% of its non-empty columns are set; the pairs' block grids are OR-ed, and every diagonal block is kept (so no query
is left without keys on grids whose frames are much smaller than a block). When L is not a multiple of block_size the
last block row/column is partial; the kernel never reads past L.

So there are two masks:
    radial_token_mask(grid, ...)    the token-level rule above (what the paper draws), [L, L]
    radial_block_grid(grid, ...)    the blocks the kernel computes, [N, N], N = ceil(L / block_size)
`sparse_pattern("radial", grid, ...).mask()` is the *block-level* set expanded to tokens (exactly the pairs both the
fast path and the reference path compute), and `.density` its fraction of the L x L pairs; `.info` has the
token-level density and the `token_mask` callable.

Implementations (`attention.impl`), all computing exactly that block-level set:
    fast       FlexAttention with a BlockMask built from the block grid (every selected block full); compiled.
    gather     the tokens of kept key blocks are gathered and dense SDPA runs batched over query blocks with equal
               key counts (no mask; the partial last block lands in its own bucket): the keys a run of consecutive
               query blocks shares (adjacent frames, sink, band overlap) once per run, the rest of each block's band
               per block, the two partial softmaxes merged by log-sum-exp; any device, forward+backward
               (`blocksparse.gather_attention`).
    reference  the same block grid expanded to an explicit BoolTensor [L, L] + SDPA; any device, forward+backward.
    auto       CPU: gather (inference and training). CUDA: fast, or gather where FlexAttention cannot run.
"""

from __future__ import annotations

import dataclasses

import torch

from vdiff.attention.blocksparse import StaticBlockSparseBackend, expand_blocks, method_options
from vdiff.attention.flex import block_mask_from_blocks
from vdiff.attention.gather import GatherPlan, gather_plan
from vdiff.attention.patterns import SparsePattern, register_pattern
from vdiff.attention.registry import register_backend
from vdiff.config import RadialConfig

SPLIT_THRESHOLD = 128  # tokens: below this undecayed band width, far frame pairs are thinned out (paper's constant)


def radial_options(config: RadialConfig | None = None, **overrides) -> RadialConfig:
    """RadialConfig from a config and/or keyword options (decay_factor, block_size, sink); checked by RadialConfig."""
    return method_options(RadialConfig, "radial", config, **overrides)


def _check_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"radial: grid must be (T, H, W) with every entry >= 1, got {grid}")
    return grid


def pair_window(dist: int, tokens_per_frame: int, opts: RadialConfig) -> int | None:
    """Band half-width |a - b| <= window for a non-sink frame pair at distance `dist`; None: the pair is dropped.
    A window >= tokens_per_frame - 1 means the whole pair."""
    p = tokens_per_frame
    undecayed = 2 ** p.bit_length() / 2 ** dist.bit_length()
    if undecayed < SPLIT_THRESHOLD and dist % int(SPLIT_THRESHOLD / undecayed) != 0:
        return None
    if dist <= 1:
        return p
    return int(max(opts.decay_factor * undecayed, opts.block_size))  # integer distances: floor is exact


def _pair_windows(grid: tuple[int, int, int], opts: RadialConfig) -> list[list[int | None]]:
    """[i][j] -> band half-width for frame pair (i, j) (tokens_per_frame = whole pair), None = not attended."""
    t, h, w = grid
    p = h * w
    out = []
    for i in range(t):
        row = []
        for j in range(t):
            row.append(p if (opts.sink and j == 0) else pair_window(abs(i - j), p, opts))
        out.append(row)
    return out


def radial_token_mask(grid: tuple[int, int, int], opts: RadialConfig | None = None, **options) -> torch.Tensor:
    """The token-level radial rule as BoolTensor [L, L] over frame-major tokens (before block reduction)."""
    grid = _check_grid(grid)
    opts = opts or radial_options(**options)
    t, h, w = grid
    p = h * w
    idx = torch.arange(p)
    diff = (idx[:, None] - idx[None, :]).abs()  # (P, P) |a - b|
    mask = torch.zeros(t * p, t * p, dtype=torch.bool)
    for i, row in enumerate(_pair_windows(grid, opts)):
        for j, window in enumerate(row):
            if window is not None:
                mask[i * p:(i + 1) * p, j * p:(j + 1) * p] = diff <= window
    return mask


def radial_block_grid(grid: tuple[int, int, int], opts: RadialConfig | None = None, **options) -> torch.Tensor:
    """The blocks the kernel computes: BoolTensor [N, N], N = ceil(L / block_size), over frame-major tokens.

    Closed form on intervals, vectorised over every (frame pair, row block, column block) at once (no [L, L] tensor,
    no loop over frame pairs): for a row block holding local rows [r0, r1) of frame i and a key b of frame j, the
    set rows are [r0, r1) & [b - window, b + window], so the keys whose count reaches some c form one interval of b,
    [r0 - window - 1 + c, r1 + window - c] (empty unless r1 - r0 >= c and 2 * window + 1 >= c). A column block's
    set keys (c = block_size // 3 + 1, the least count above 1/3 of the block) and non-empty keys (c = 1) are then
    interval intersections. Milliseconds at Wan 720p (21, 45, 80) = 75,600 tokens.
    """
    grid = _check_grid(grid)
    opts = opts or radial_options(**options)
    t, h, w = grid
    p, bs = h * w, opts.block_size
    n = -(-(t * p) // bs)
    windows = torch.tensor([[-1 if win is None else min(win, p) for win in row] for row in _pair_windows(grid, opts)])
    qi, kj = (windows >= 0).nonzero(as_tuple=True)  # (M,) attended frame pairs
    win = windows[qi, kj][:, None, None]  # (M, 1, 1)
    span = -(-p // bs) + 1  # most blocks a frame touches
    offs = torch.arange(span)
    rb = (qi * p // bs)[:, None] + offs  # (M, span) row blocks touching frame i
    cb = (kj * p // bs)[:, None] + offs  # (M, span) column blocks touching frame j
    r0 = (rb * bs - (qi * p)[:, None]).clamp(min=0)[:, :, None]  # (M, span, 1) local rows [r0, r1) in frame i
    r1 = ((rb + 1) * bs - (qi * p)[:, None]).clamp(max=p)[:, :, None]
    c0 = (cb * bs - (kj * p)[:, None]).clamp(min=0)[:, None, :]  # (M, 1, span) local keys [c0, c1) in frame j
    c1 = ((cb + 1) * bs - (kj * p)[:, None]).clamp(max=p)[:, None, :]

    def keys_reaching(c: int) -> torch.Tensor:
        """(M, span, span): keys of each column block whose count of set rows in the row block is >= c."""
        lo = torch.maximum(r0 - win - 1 + c, c0)
        hi = torch.minimum(r1 + win - c, c1 - 1)
        possible = (r1 - r0 >= c) & (2 * win + 1 >= c)
        return (hi - lo + 1).clamp(min=0) * possible

    high = keys_reaching(bs // 3 + 1)  # a key column is set: > 1/3 of the block's rows
    nonempty = keys_reaching(1)
    keep = (5 * high > 3 * nonempty) & (r1 > r0) & (c1 > c0)  # keep the block: > 60% of its non-empty columns set
    m, r, c = keep.nonzero(as_tuple=True)
    blocks = torch.zeros(n * n, dtype=torch.bool)
    blocks[rb[m, r] * n + cb[m, c]] = True
    blocks = blocks.view(n, n)
    # Every query block keeps its own block: where a frame is much smaller than a block (e.g. 16 tokens per frame,
    # block 128), the reduction can drop every pair of a block row (a frame's own pair covers < 1/3 of the block's
    # rows), leaving queries with no keys at all. Wherever frames span a block or more, the diagonal is already kept.
    blocks |= torch.eye(n, dtype=torch.bool)
    return blocks


def _radial_pattern(grid, *, q=None, k=None, layer=0, **options) -> SparsePattern:
    """Options: decay_factor, block_size, sink (defaults: `RadialConfig`)."""
    grid = _check_grid(grid)
    opts = radial_options(**options)
    blocks = radial_block_grid(grid, opts)
    length = grid[0] * grid[1] * grid[2]
    density = _block_grid_density(blocks, opts.block_size, length)
    return SparsePattern(
        method="radial", grid=grid, density=density,
        _mask_fn=lambda: expand_blocks(blocks, opts.block_size, length),
        info={
            "options": dataclasses.asdict(opts),
            "block_grid": blocks,
            "block_density": blocks.float().mean().item(),
            "token_mask": lambda: radial_token_mask(grid, opts),
            "note": ".mask()/.density are the whole blocks the kernel computes; token_mask() is the rule before "
                    "block reduction",
        },
    )


def _block_grid_density(blocks: torch.Tensor, block_size: int, length: int) -> float:
    """Fraction of the L x L token pairs inside the selected blocks (the last block may be partial)."""
    n = blocks.shape[-1]
    sizes = torch.full((n,), block_size, dtype=torch.float64)
    sizes[-1] = length - (n - 1) * block_size
    return float(sizes @ blocks.double() @ sizes) / length**2


register_pattern("radial", _radial_pattern)


# Runs of up to this many consecutive queries share one gather + SDPA for the keys they have in common (adjacent
# frames, the sink, the overlap of their bands); each query block gathers only the rest of its band. Measured on 2
# CPU cores against one gather per query block (same process, 4 heads, d=64): 1.6x faster at grid (8, 32, 32),
# 1.08x at (32, 16, 16) with the sink, no change without it.
SHARE_TOKENS = 1024


def radial_gather_plan(blocks: torch.Tensor, block_size: int, length: int, device: torch.device | str,
                       share_tokens: int = SHARE_TOKENS) -> GatherPlan:
    """The gather path's index tensors for a block grid [N, N] over `length` frame-major tokens."""
    starts = torch.arange(blocks.shape[0]) * block_size
    sizes = (starts + block_size).clamp(max=length) - starts  # the last block may be partial
    return gather_plan(starts, sizes, blocks, device, share_tokens=share_tokens)


# --------------------------------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------------------------------


class RadialLayout:
    """Radial's pattern for one (grid, options): the kernel's block grid and what each implementation needs."""

    perm = None  # frame-major: radial needs no reorder

    def __init__(self, grid: tuple[int, int, int], opts: RadialConfig):
        self.grid, self.opts = _check_grid(grid), opts
        self.length = self.grid[0] * self.grid[1] * self.grid[2]
        self.blocks = radial_block_grid(self.grid, opts)  # [N, N]

    def density(self) -> float:
        return _block_grid_density(self.blocks, self.opts.block_size, self.length)

    def gather_plan(self, device: torch.device | str) -> GatherPlan:
        return radial_gather_plan(self.blocks, self.opts.block_size, self.length, device)

    def block_mask(self, device: torch.device | str):
        return block_mask_from_blocks(self.blocks, self.opts.block_size, self.length, device)

    def reference_mask(self, device: torch.device | str) -> torch.Tensor:
        return expand_blocks(self.blocks, self.opts.block_size, self.length).to(device)

    def token_mask(self) -> torch.Tensor:
        return expand_blocks(self.blocks, self.opts.block_size, self.length)


class RadialBackend(StaticBlockSparseBackend):
    name = "radial"
    description = (
        "radial attention (static, frame-major): fast = FlexAttention block mask (GPU; on CPU forward only, compiled "
        "Flex has no backward), gather = SDPA over gathered key blocks, reference = explicit mask + SDPA (both any "
        "device, with backward). impl=auto: CPU gather (inference and training), CUDA fast (gather where "
        "FlexAttention cannot run); impl=fast with a gradient on CPU raises."
    )

    def build_layout(self, grid: tuple[int, int, int], options: RadialConfig) -> RadialLayout:
        return RadialLayout(grid, options)


register_backend(RadialBackend())
