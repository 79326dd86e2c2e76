"""Radial attention: the mask follows the paper's rule, the block reduction is the reference's, and the fast path
(FlexAttention) and the reference path (mask + SDPA) compute exactly `sparse_pattern("radial", ...).mask()`."""

import hashlib

import pytest
import torch

from vdiff.attention import (
    AttentionContext,
    BackendUnavailable,
    MaskCache,
    available,
    get_backend,
    sparse_pattern,
)
from vdiff.attention.dense import reference_attention
from vdiff.attention.radial import radial_block_grid, radial_token_mask
from vdiff.config import AttentionConfig, RadialConfig

# ---------------------------------------------------------------------------------------------------------------------
# An independent, literal transcription of the rule (loops, no vectorisation), to hold the module to.
# ---------------------------------------------------------------------------------------------------------------------


def _literal_pair_mask(i, j, p, decay, bs, sink):
    if sink and j == 0:
        return torch.ones(p, p, dtype=torch.bool)
    dist = abs(i - j)
    undecayed = 2 ** p.bit_length() / 2 ** dist.bit_length()
    if undecayed < 128 and dist % int(128 / undecayed) != 0:
        return torch.zeros(p, p, dtype=torch.bool)
    window = p if dist <= 1 else max(decay * undecayed, bs)
    a = torch.arange(p)
    return (a[:, None] - a[None, :]).abs() <= window


def _literal_blocks(grid, decay, bs, sink):
    """Each frame pair's token mask placed on the global block grid (zero-padded), reduced (col set if > 1/3 of the
    block's rows; block kept if > 60% of non-empty cols set), OR-ed; plus every diagonal block."""
    t, h, w = grid
    p, length = h * w, t * h * w
    n = -(-length // bs)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(t):
        for j in range(t):
            canvas = torch.zeros(n * bs, n * bs, dtype=torch.bool)
            canvas[i * p:(i + 1) * p, j * p:(j + 1) * p] = _literal_pair_mask(i, j, p, decay, bs, sink)
            col_density = canvas.view(n, bs, n, bs).sum(1).float() / bs  # (n, n, bs)
            high = (col_density > 1 / 3).sum(-1).float()
            nonempty = (col_density > 0).sum(-1).float()
            out |= high / (nonempty + 1e-9) > 0.6
    for r in range(n):
        out[r, r] = True
    return out


def _per_pair_blocks(grid, decay, bs, sink):
    """The block reduction as it was written before it was vectorised (one count tensor per distinct frame pair):
    count[R, b] = rows of block R inside frame i with |a - b| <= window, for each key b of frame j."""
    t, h, w = grid
    p = h * w
    n = -(-(t * p) // bs)
    blocks = torch.zeros(n, n, dtype=torch.bool)
    b_local = torch.arange(p)
    for i in range(t):
        for j in range(t):
            dist = abs(i - j)
            undecayed = 2 ** p.bit_length() / 2 ** dist.bit_length()
            if sink and j == 0:
                window = p
            elif undecayed < 128 and dist % int(128 / undecayed) != 0:
                continue
            else:
                window = p if dist <= 1 else int(max(decay * undecayed, bs))
            window, row_off, col_off = min(window, p), (i * p) % bs, (j * p) % bs
            nr = (row_off + p - 1) // bs + 1
            rb = torch.arange(nr)
            r0 = (rb * bs - row_off).clamp(min=0)[:, None]
            r1 = ((rb + 1) * bs - row_off).clamp(max=p)[:, None]
            lo = torch.maximum(r0, b_local[None, :] - window)
            hi = torch.minimum(r1, b_local[None, :] + window + 1)
            count = (hi - lo).clamp(min=0)
            col_block = (col_off + b_local) // bs
            nc = int(col_block[-1]) + 1
            high = torch.zeros(nr, nc, dtype=torch.int32).index_add_(1, col_block, (3 * count > bs).int())
            nonempty = torch.zeros(nr, nc, dtype=torch.int32).index_add_(1, col_block, (count > 0).int())
            r_first, c_first = (i * p) // bs, (j * p) // bs
            blocks[r_first:r_first + nr, c_first:c_first + nc] |= 5 * high > 3 * nonempty
    return blocks | torch.eye(n, dtype=torch.bool)


GRIDS = [
    # grid, decay, block, sink: tokens per frame 64 (every far pair thinned out), 200 (not a multiple of the block,
    # L = 1000 not either), 120 with blocks of 32, sink off
    ((4, 8, 8), 1.0, 64, True),
    ((5, 10, 20), 0.5, 64, True),
    ((6, 10, 12), 0.3, 32, False),
]


@pytest.mark.parametrize("grid,decay,bs,sink", GRIDS)
def test_masks_match_literal_rule(grid, decay, bs, sink):
    t, h, w = grid
    p = h * w
    token = radial_token_mask(grid, decay_factor=decay, block_size=bs, sink=sink)
    literal = torch.zeros_like(token)
    for i in range(t):
        for j in range(t):
            literal[i * p:(i + 1) * p, j * p:(j + 1) * p] = _literal_pair_mask(i, j, p, decay, bs, sink)
    assert torch.equal(token, literal)
    blocks = radial_block_grid(grid, decay_factor=decay, block_size=bs, sink=sink)
    assert torch.equal(blocks, _literal_blocks(grid, decay, bs, sink))
    # the pattern's mask is those whole blocks over the L x L tokens, its density their share
    pattern = sparse_pattern("radial", grid, decay_factor=decay, block_size=bs, sink=sink)
    mask = pattern.mask()
    expected = blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[: t * p, : t * p]
    assert torch.equal(mask, expected)
    assert pattern.density == pytest.approx(mask.double().mean().item(), abs=1e-12)
    assert 0 < pattern.density < 1
    assert torch.equal(pattern.info["token_mask"](), token)


def test_rule_known_answers():
    # 4 frames of 256 tokens, block 128, decay 1, no sink: dist <= 1 whole pairs; dist 2..3: undecayed width
    # 2**9 / 4 = 128 (not below 128: no thinning), band max(128, 128) = 128
    token = radial_token_mask((4, 16, 16), decay_factor=1.0, block_size=128, sink=False)
    p = 256
    assert token[:2 * p, :2 * p].all()  # frames 0, 1 attend each other fully
    pair_02 = token[:p, 2 * p:3 * p]
    a = torch.arange(p)
    assert torch.equal(pair_02, (a[:, None] - a[None, :]).abs() <= 128)
    # with the sink every query attends all of frame 0
    assert radial_token_mask((4, 16, 16), decay_factor=1.0, block_size=128, sink=True)[:, :p].all()


def test_frames_smaller_than_a_block_keep_the_diagonal():
    """16 tokens per frame (the bundled model's grid (16, 4, 4)), block 128: every non-sink pair but dist 0 is thinned
    out, and a frame's own pair covers 16 of a block's 128 rows (< 1/3), so the reduction alone keeps no block of the
    rows without the sink; the diagonal rule keeps each block's own, so every query attends something."""
    grid = (16, 4, 4)
    for sink in (False, True):
        blocks = radial_block_grid(grid, decay_factor=1.0, block_size=128, sink=sink)
        assert blocks.shape == (2, 2) and blocks.any(1).all()
        assert torch.equal(blocks, _literal_blocks(grid, 1.0, 128, sink))
    assert radial_block_grid(grid, decay_factor=1.0, block_size=128, sink=False).tolist() == [
        [True, False], [False, True]
    ]
    q, k, v = (torch.randn(1, 256, 2, 8) for _ in range(3))
    ctx = AttentionContext(grid=grid, config=AttentionConfig(backend="radial", radial=RadialConfig(decay_factor=1.0)),
                           mask_cache=MaskCache())
    out = get_backend("radial", "cpu").forward(q, k, v, ctx)
    assert torch.isfinite(out).all()
    # each 128-token block attends exactly itself: dense attention within the block
    ref = torch.nn.functional.scaled_dot_product_attention(*(t[:, :128].transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out[:, :128], ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_density_wan_768p_reference_value(monkeypatch):
    """Grid (18, 48, 80) (Wan 768p, 69 frames), decay 0.2, block 128, sink: the reference's 0.2871 block density,
    computed at block level: the [L, L] token mask (19 GB of bools at 69k tokens) is never built."""
    from vdiff.attention import radial

    def no_token_mask(*args, **kwargs):
        raise AssertionError("the density must not build the [L, L] token mask")

    monkeypatch.setattr(radial, "radial_token_mask", no_token_mask)
    monkeypatch.setattr(radial, "expand_blocks", no_token_mask)
    pattern = sparse_pattern("radial", (18, 48, 80), decay_factor=0.2, block_size=128, sink=True)
    assert pattern.density == pytest.approx(0.2871, abs=0.002)
    assert pattern.info["block_density"] == pytest.approx(0.2871, abs=0.002)


@pytest.mark.parametrize("grid", [(21, 30, 52), (21, 45, 80)])
def test_any_grid_not_multiple_of_block(grid):
    # 1560 / 3600 tokens per frame: not multiples of 128; the last block is partial
    pattern = sparse_pattern("radial", grid, decay_factor=0.2, block_size=128, sink=True)
    assert 0.1 < pattern.density < 0.5
    blocks = pattern.info["block_grid"]
    assert blocks.diagonal().all()  # every query block attends its own block


@pytest.mark.parametrize("grid", [(4, 8, 8), (5, 10, 20), (16, 4, 4), (3, 1, 1), (7, 3, 50), (9, 16, 20), (13, 2, 3),
                                  (31, 8, 9), (6, 30, 52)])
@pytest.mark.parametrize("decay,bs,sink", [(0.2, 128, True), (1.0, 64, False), (0.5, 32, True), (3.0, 128, False)])
def test_block_grid_equals_per_pair_reduction(grid, decay, bs, sink):
    """The vectorised interval form gives the same blocks as the per-frame-pair count reduction it replaced."""
    blocks = radial_block_grid(grid, decay_factor=decay, block_size=bs, sink=sink)
    assert torch.equal(blocks, _per_pair_blocks(grid, decay, bs, sink))


# The per-pair reduction's block grids at the Wan grids (block 128, sink), recorded before it was vectorised: number of
# blocks kept and sha256 of the [N, N] bool grid's bytes (it took 1-16 s per grid at 720p on 2 cores).
WAN_REFERENCE = {
    ((21, 30, 52), 0.2): (22201, "fbda36d77eafc6b1"),
    ((21, 30, 52), 1.0): (29155, "2c919322850ed396"),
    ((21, 45, 80), 0.2): (91470, "daaedd87e17e6afd"),
    ((21, 45, 80), 1.0): (138298, "68edc138446112a3"),
}


@pytest.mark.parametrize("grid,decay", sorted(WAN_REFERENCE))
def test_block_grid_at_wan_shapes_matches_recorded_reference(grid, decay):
    blocks = radial_block_grid(grid, decay_factor=decay, block_size=128, sink=True)
    count, digest = WAN_REFERENCE[(grid, decay)]
    assert int(blocks.sum()) == count
    assert hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16] == digest


def _ctx(grid, decay, bs, sink, impl="auto", cache=None):
    cfg = AttentionConfig(
        backend="radial", impl=impl, radial=RadialConfig(decay_factor=decay, block_size=bs, sink=sink)
    )
    return AttentionContext(grid=grid, config=cfg, mask_cache=cache if cache is not None else MaskCache())


def _qkv(length, heads=2, dim=16, batch=2, requires_grad=False):
    return [torch.randn(batch, length, heads, dim, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("grid,decay,bs,sink", [GRIDS[0], GRIDS[1]])
def test_fast_equals_reference_forward(grid, decay, bs, sink):
    backend = get_backend("radial", "cpu")
    length = grid[0] * grid[1] * grid[2]
    q, k, v = _qkv(length)
    expected = reference_attention(q, k, v, sparse_pattern("radial", grid, decay_factor=decay, block_size=bs,
                                                           sink=sink).mask())
    with torch.no_grad():
        fast = backend.forward(q, k, v, _ctx(grid, decay, bs, sink, impl="fast"))
        ref = backend.forward(q, k, v, _ctx(grid, decay, bs, sink, impl="reference"))
    torch.testing.assert_close(fast.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ref.double(), expected, atol=2e-6, rtol=1e-5)


def test_backward_on_cpu_auto_matches_float64():
    grid, decay, bs, sink = GRIDS[1]
    backend = get_backend("radial", "cpu")
    length = grid[0] * grid[1] * grid[2]
    q, k, v = _qkv(length, requires_grad=True)
    grad_out = torch.randn(2, length, 2, 16)
    out = backend.forward(q, k, v, _ctx(grid, decay, bs, sink, impl="auto"))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = sparse_pattern("radial", grid, decay_factor=decay, block_size=bs, sink=sink).mask()
    out64 = reference_attention(q64, k64, v64, mask)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    torch.testing.assert_close(out.double(), out64, atol=2e-6, rtol=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-4)


def test_fast_with_grad_on_cpu_raises_with_reason():
    grid, decay, bs, sink = GRIDS[0]
    q, k, v = _qkv(256, requires_grad=True)
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        get_backend("radial", "cpu").forward(q, k, v, _ctx(grid, decay, bs, sink, impl="fast"))
    status = available("cpu")["radial"]
    assert status.available and status.backward  # impl=auto trains on CPU through the gather path
    assert "gather" in status.description and "no backward" in status.description


def test_masks_built_once_and_cached():
    grid, decay, bs, sink = GRIDS[0]
    backend = get_backend("radial", "cpu")
    cache = MaskCache()
    q, k, v = _qkv(256)
    ctx = _ctx(grid, decay, bs, sink, impl="reference", cache=cache)
    first = backend.forward(q, k, v, ctx)
    misses = cache.misses
    assert misses > 0
    for layer in range(3):  # other layers, another step: nothing is rebuilt
        again = backend.forward(q, k, v, ctx.for_layer(layer))
        assert backend.density(ctx) == pytest.approx(sparse_pattern("radial", grid, decay_factor=decay,
                                                                     block_size=bs, sink=sink).density)
    assert cache.misses == misses + 1  # the density entry, once
    assert torch.equal(first, again)
    backend.density(ctx)
    assert cache.misses == misses + 1 and cache.hits > 0


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="attention.radial.block_size"):
        sparse_pattern("radial", (2, 4, 4), block_size=100)
    with pytest.raises(ValueError, match="attention.radial.decay_factor"):
        sparse_pattern("radial", (2, 4, 4), decay_factor=0)
    with pytest.raises(ValueError, match="unknown option"):
        sparse_pattern("radial", (2, 4, 4), window=3)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [64, 128])
def test_fast_forward_backward_on_gpu(bs):
    """On CUDA the fast path trains: forward and gradients equal the float64 masked reference."""
    grid = (6, 16, 20)  # 320 tokens per frame: not a multiple of the block
    length = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, length, 2, 32, device="cuda", requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, length, 2, 32, device="cuda")
    out = get_backend("radial", "cuda").forward(q, k, v, _ctx(grid, 0.5, bs, True, impl="fast"))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = sparse_pattern("radial", grid, decay_factor=0.5, block_size=bs, sink=True).mask().cuda()
    out64 = reference_attention(q64, k64, v64, mask)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    torch.testing.assert_close(out.double(), out64, atol=1e-4, rtol=1e-3)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=1e-3, rtol=1e-3)
