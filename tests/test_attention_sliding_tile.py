"""Sliding tile attention: tile-major order, the window rule (centre clamped, same tile count for every query tile,
partial tiles), and fast (FlexAttention) == reference (mask + SDPA) == `sparse_pattern(...).mask()`."""

import pytest
import torch

from vdiff.attention import AttentionContext, BackendUnavailable, MaskCache, available, get_backend, sparse_pattern
from vdiff.attention.dense import reference_attention
from vdiff.attention.flex import flex_run
from vdiff.attention.sliding_tile import TileLayout, tile_options
from vdiff.config import AttentionConfig, SlidingTileConfig

CASES = [
    # grid, tile, window: a multiple of the tile; partial tiles on every axis with an even window
    ((4, 8, 8), (2, 4, 4), (1, 3, 3)),
    ((5, 6, 7), (2, 4, 4), (2, 2, 3)),
]


def _literal_mask(grid, tile, window):
    """Frame-major [L, L] from the rule written out per token pair axis by axis (loops over tiles)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    allowed_axis = []
    for size, t, m in zip(grid, tile, window):
        n = -(-size // t)
        m = min(m, n)
        rows = []
        for i in range(n):
            start = min(max(i - m // 2, 0), n - m)
            rows.append([start <= j < start + m for j in range(n)])
        allowed_axis.append(torch.tensor(rows))
    mask = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis in range(3):
        tq = coords[:, axis] // tile[axis]
        mask &= allowed_axis[axis][tq[:, None], tq[None, :]]
    return mask


def test_window_centre_clamped_known_answer():
    # one row of 10 tokens in tiles of 2 -> 5 tiles; window 3: tile 0 -> {0,1,2}, 2 -> {1,2,3}, 4 -> {2,3,4}
    mask = sparse_pattern("sliding_tile", (1, 1, 10), tile=(1, 1, 2), window=(1, 1, 3)).mask()
    tiles_attended = mask[::2, ::2]  # one token per tile
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert torch.equal(tiles_attended, expected.bool())


@pytest.mark.parametrize(
    "grid,tile,window", CASES + [((3, 5, 9), (2, 2, 4), (3, 1, 2)), ((2, 3, 3), (4, 4, 4), (3, 3, 3))]
)
def test_pattern_matches_rule_and_properties(grid, tile, window):
    pattern = sparse_pattern("sliding_tile", grid, tile=tile, window=window)
    mask = pattern.mask()
    assert torch.equal(mask, _literal_mask(grid, tile, window))
    assert pattern.density == pytest.approx(mask.double().mean().item(), abs=1e-12)
    layout = TileLayout(grid, tile_options(tile=tile, window=window))
    # every query tile attends the same number of tiles, also with partial tiles and clamped windows
    per_tile = layout.allowed.sum(1)
    assert (per_tile == pattern.info["tiles_attended"]).all()
    expected_count = 1
    for size, t, m in zip(grid, tile, window):
        expected_count *= min(m, -(-size // t))
    assert pattern.info["tiles_attended"] == expected_count


@pytest.mark.parametrize("grid,tile", [((4, 8, 8), (2, 4, 4)), ((5, 6, 7), (2, 4, 4))])
def test_token_order_is_tile_major(grid, tile):
    cfg = AttentionConfig(backend="sliding_tile", sliding_tile=SlidingTileConfig(tile=tile, window=(1, 1, 1)))
    perm = get_backend("sliding_tile", "cpu").token_order(grid, cfg)
    length = grid[0] * grid[1] * grid[2]
    assert torch.equal(perm.sort().values, torch.arange(length))  # a permutation
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)[perm]
    tile_idx = coords // torch.tensor(tile)
    ntiles = [-(-g // t) for g, t in zip(grid, tile)]
    tile_id = (tile_idx[:, 0] * ntiles[1] + tile_idx[:, 1]) * ntiles[2] + tile_idx[:, 2]
    assert (tile_id.diff() >= 0).all()  # tiles are contiguous runs, in (t, h, w) tile order
    assert torch.equal(tile_id.unique(), torch.arange(ntiles[0] * ntiles[1] * ntiles[2]))
    within = perm.view(-1)
    same_tile = tile_id[1:] == tile_id[:-1]
    assert (within[1:][same_tile] > within[:-1][same_tile]).all()  # frame-major inside a tile


@pytest.mark.parametrize("grid,tile,window,block", [
    ((5, 6, 7), (2, 4, 4), (2, 2, 3), 16),  # partial tiles on every axis
    ((7, 13, 11), (2, 4, 4), (3, 3, 3), 32),  # whole blocks per class, shared remainder blocks, padding
    ((3, 5, 9), (2, 2, 4), (3, 1, 2), 8),
    ((6, 15, 26), (3, 4, 4), (3, 3, 3), 64),
])
def test_flex_plan_computes_exactly_the_pattern(grid, tile, window, block):
    """The packed layouts hold every token once on each side; inside visited blocks the tile rule on real keys is
    exactly the pattern; full blocks need no mask; no block is visited without an attended pair."""
    layout = TileLayout(grid, tile_options(tile=tile, window=window))
    plan = layout.flex_plan(block)
    length = grid[0] * grid[1] * grid[2]
    real_q, real_k = plan.q_index >= 0, plan.kv_index >= 0
    for index, real in ((plan.q_index, real_q), (plan.kv_index, real_k)):
        assert torch.equal(index[real].sort().values, torch.arange(length))
    assert torch.equal(plan.q_index[plan.out_index], torch.arange(length))
    rule = plan.allowed[plan.q_tile[:, None], plan.kv_tile[None, :]] & real_k[None, :]  # [Lq', Lk'] what mask_mod says
    visited = plan.any.repeat_interleave(block, 0).repeat_interleave(block, 1)
    full = plan.full.repeat_interleave(block, 0).repeat_interleave(block, 1)
    computed = (visited & rule)[real_q][:, real_k]
    assert torch.equal(computed, layout.mask_tile_major()[plan.q_index[real_q]][:, plan.kv_index[real_k]])
    assert (rule | ~full).all()  # a full block has no pair the rule excludes
    assert torch.equal(_visited_blocks(rule, block), plan.any)


def _visited_blocks(mask, block):
    return mask.view(mask.shape[0] // block, block, mask.shape[1] // block, block).any(3).any(1)


@pytest.mark.parametrize("grid", [(21, 30, 52), (21, 45, 80)])
@pytest.mark.parametrize("window", [(3, 3, 3), (3, 3, 5)])
def test_wan_shapes_visit_what_the_density_says(grid, window):
    """At the Wan grids partial tiles no longer make 128-token blocks straddle tiles: the kernel's work (blocks
    visited x block area / L^2) is within 0.01 of the density (plain tile-major order: 0.335 vs 0.272 at 480p)."""
    pattern = sparse_pattern("sliding_tile", grid, tile=(6, 8, 8), window=window)
    work = pattern.info["kernel_block_density"]
    assert pattern.density <= work <= pattern.density + 0.01
    nq, nk, visited = pattern.info["kernel_blocks"]
    assert abs(visited / (nq * nk) - pattern.density) <= 0.01


def _ctx(grid, tile, window, impl="auto", cache=None):
    cfg = AttentionConfig(backend="sliding_tile", impl=impl,
                          sliding_tile=SlidingTileConfig(tile=tile, window=window))
    return AttentionContext(grid=grid, config=cfg, mask_cache=cache if cache is not None else MaskCache())


def _perm(grid, ctx):
    return get_backend("sliding_tile", "cpu").token_order(grid, ctx.config)


@pytest.mark.parametrize("grid,tile,window", CASES)
def test_fast_equals_reference_forward(grid, tile, window):
    backend = get_backend("sliding_tile", "cpu")
    length = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(2, length, 2, 16) for _ in range(3))  # frame-major
    expected = reference_attention(q, k, v, sparse_pattern("sliding_tile", grid, tile=tile, window=window).mask())
    perm = _perm(grid, _ctx(grid, tile, window))
    inv = torch.argsort(perm)
    qt, kt, vt = q[:, perm], k[:, perm], v[:, perm]  # tile-major, as the model hands them over
    with torch.no_grad():
        fast = backend.forward(qt, kt, vt, _ctx(grid, tile, window, impl="fast"))[:, inv]
        ref = backend.forward(qt, kt, vt, _ctx(grid, tile, window, impl="reference"))[:, inv]
    torch.testing.assert_close(fast.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ref.double(), expected, atol=2e-6, rtol=1e-5)


def test_fast_packed_layout_equals_float64_reference():
    """FlexAttention on the packed layouts with 32-token blocks (full blocks, shared blocks, padding keys and padded
    query rows all occur) equals the float64 masked reference."""
    grid, tile, window = (7, 13, 11), (2, 4, 4), (3, 3, 3)
    length = grid[0] * grid[1] * grid[2]
    layout = TileLayout(grid, tile_options(tile=tile, window=window))
    plan = layout.flex_plan(32)
    assert plan.full.any() and (plan.any & ~plan.full).any() and (plan.kv_index < 0).any()
    q, k, v = (torch.randn(1, length, 2, 16) for _ in range(3))  # tile-major
    with torch.no_grad():
        fast = flex_run(q, k, v, layout.block_mask("cpu", block_size=32))
    expected = reference_attention(q.double(), k.double(), v.double(), layout.mask_tile_major())
    torch.testing.assert_close(fast.double(), expected, atol=2e-6, rtol=1e-5)


def test_backward_on_cpu_auto_matches_float64():
    grid, tile, window = CASES[1]
    backend = get_backend("sliding_tile", "cpu")
    length = grid[0] * grid[1] * grid[2]
    ctx = _ctx(grid, tile, window, impl="auto")
    perm = _perm(grid, ctx)
    q, k, v = (torch.randn(2, length, 2, 16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, length, 2, 16)
    out = backend.forward(q[:, perm], k[:, perm], v[:, perm], ctx)[:, torch.argsort(perm)]
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = reference_attention(q64, k64, v64, sparse_pattern("sliding_tile", grid, tile=tile, window=window).mask())
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-4)


def test_fast_with_grad_on_cpu_raises_with_reason():
    grid, tile, window = CASES[0]
    q, k, v = (torch.randn(1, 256, 2, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        get_backend("sliding_tile", "cpu").forward(q, k, v, _ctx(grid, tile, window, impl="fast"))
    status = available("cpu")["sliding_tile"]
    assert status.available and status.backward and "gather" in status.description


def test_masks_built_once_and_cached():
    grid, tile, window = CASES[0]
    backend = get_backend("sliding_tile", "cpu")
    cache = MaskCache()
    ctx = _ctx(grid, tile, window, impl="reference", cache=cache)
    q, k, v = (torch.randn(1, 256, 2, 16) for _ in range(3))
    first = backend.forward(q, k, v, ctx)
    backend.density(ctx)
    misses = cache.misses
    assert misses >= 2  # layout + mask, density
    for layer in range(3):
        again = backend.forward(q, k, v, ctx.for_layer(layer))
        backend.density(ctx.for_layer(layer))
    assert cache.misses == misses
    assert torch.equal(first, again)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="attention.sliding_tile.window"):
        sparse_pattern("sliding_tile", (2, 4, 4), tile=(1, 2, 2), window=(0, 1, 1))
    with pytest.raises(ValueError, match="attention.sliding_tile.tile"):
        sparse_pattern("sliding_tile", (2, 4, 4), tile=(1, 2), window=(1, 1, 1))


@pytest.mark.gpu
def test_fast_forward_backward_on_gpu():
    """On CUDA the fast path trains: forward and gradients equal the float64 masked reference (partial tiles)."""
    grid, tile, window = (5, 12, 14), (2, 8, 8), (2, 3, 3)
    length = grid[0] * grid[1] * grid[2]
    ctx = _ctx(grid, tile, window, impl="fast")
    perm = _perm(grid, ctx).cuda()
    q, k, v = (torch.randn(1, length, 2, 32, device="cuda", requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, length, 2, 32, device="cuda")
    out = get_backend("sliding_tile", "cuda").forward(q[:, perm], k[:, perm], v[:, perm], ctx)[:, torch.argsort(perm)]
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = sparse_pattern("sliding_tile", grid, tile=tile, window=window).mask().cuda()
    out64 = reference_attention(q64, k64, v64, mask)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    torch.testing.assert_close(out.double(), out64, atol=1e-4, rtol=1e-3)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=1e-3, rtol=1e-3)
