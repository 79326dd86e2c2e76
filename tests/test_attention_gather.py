"""The gather path (impl=gather: dense SDPA over gathered key blocks) for the static methods: it computes exactly
`sparse_pattern(...).mask()` (forward and gradients vs a float64 masked reference) on grids that are not multiples of
the block / tile, it is what impl=auto runs on CPU, and through VideoDiT it equals the reference path."""

import pytest
import torch

from vdiff.attention import AttentionContext, AttentionStats, MaskCache, get_backend, sparse_pattern
from vdiff.attention.dense import reference_attention
from vdiff.attention.gather import gather_attention, gather_plan, shared_key_sets
from vdiff.attention.policy import choose_impl
from vdiff.attention.radial import radial_gather_plan
from vdiff.config import AttentionConfig, RadialConfig, SlidingTileConfig
from vdiff.models.dit import VideoDiT

RADIAL = [
    # grid, decay, block, sink: 200 tokens per frame, L = 1000 (last block of 40 tokens); 120 per frame, L = 720
    # with blocks of 32 (last block of 16)
    ((5, 10, 20), 0.5, 64, True),
    ((5, 10, 20), 0.5, 64, False),
    ((6, 10, 12), 0.3, 32, False),
    ((6, 10, 12), 0.3, 32, True),
]
TILE = [
    # grid, tile, window: partial tiles on every axis (even and odd windows, clamped at the edges)
    ((5, 6, 7), (2, 4, 4), (2, 2, 3)),
    ((3, 5, 9), (2, 2, 4), (3, 1, 2)),
]


def _radial_cfg(decay, bs, sink, impl="gather"):
    return AttentionConfig(
        backend="radial", impl=impl, radial=RadialConfig(decay_factor=decay, block_size=bs, sink=sink)
    )


def _tile_cfg(tile, window, impl="gather"):
    return AttentionConfig(backend="sliding_tile", impl=impl, sliding_tile=SlidingTileConfig(tile=tile, window=window))


def _check_against_float64(run, mask, length, heads=2, dim=16, batch=2):
    """run(q, k, v) over frame-major [B, L, H, D] -> out; forward and d(q, k, v) vs the float64 masked reference."""
    q, k, v = (torch.randn(batch, length, heads, dim, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(batch, length, heads, dim)
    out = run(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = reference_attention(q64, k64, v64, mask)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    torch.testing.assert_close(out.double(), out64, atol=2e-6, rtol=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grid,decay,bs,sink", RADIAL)
def test_radial_gather_equals_float64_reference(grid, decay, bs, sink):
    length = grid[0] * grid[1] * grid[2]
    pattern = sparse_pattern("radial", grid, decay_factor=decay, block_size=bs, sink=sink)
    mask = pattern.mask()
    plan = radial_gather_plan(pattern.info["block_grid"], bs, length, "cpu")
    assert plan.num_pairs == int(mask.sum())  # exactly the pattern's pairs: nothing padded
    assert len(plan.buckets) > 1 and length % bs != 0  # several buckets, the partial last block among them
    assert plan.split  # key sets shared by neighbouring query blocks: two partial softmaxes merged
    ctx = AttentionContext(grid=grid, config=_radial_cfg(decay, bs, sink), mask_cache=MaskCache())
    _check_against_float64(lambda q, k, v: get_backend("radial", "cpu").forward(q, k, v, ctx), mask, length)


@pytest.mark.parametrize("grid,tile,window", TILE)
def test_sliding_tile_gather_equals_float64_reference(grid, tile, window):
    length = grid[0] * grid[1] * grid[2]
    pattern = sparse_pattern("sliding_tile", grid, tile=tile, window=window)
    ctx = AttentionContext(grid=grid, config=_tile_cfg(tile, window), mask_cache=MaskCache())
    backend = get_backend("sliding_tile", "cpu")
    perm = backend.token_order(grid, ctx.config)
    inv = torch.argsort(perm)

    def run(q, k, v):  # the model hands attention tile-major tokens; compare in frame-major order
        return backend.forward(q[:, perm], k[:, perm], v[:, perm], ctx)[:, inv]

    _check_against_float64(run, pattern.mask(), length)


@pytest.mark.parametrize("share_tokens", [0, 256])
def test_matmul_path_equals_float64_reference(monkeypatch, share_tokens):
    """The forward and backward used off CPU (plain matmuls with the log-sum-exp, no CPU flash kernel) are exact too,
    with and without split key sets."""
    from vdiff.attention import gather as gather_kernel

    monkeypatch.setattr(gather_kernel, "_cpu_flash", lambda q: False)
    grid, decay, bs, sink = RADIAL[0]
    length = grid[0] * grid[1] * grid[2]
    pattern = sparse_pattern("radial", grid, decay_factor=decay, block_size=bs, sink=sink)
    plan = radial_gather_plan(pattern.info["block_grid"], bs, length, "cpu", share_tokens=share_tokens)
    assert plan.split == (share_tokens > 0)
    _check_against_float64(lambda q, k, v: gather_attention(q, k, v, plan, chunk_bytes=1 << 16), pattern.mask(), length)


def test_small_chunks_and_batch_give_the_same_result():
    """A bucket split into one group per SDPA call equals one call per bucket; batch elements stay apart."""
    grid, decay, bs, sink = RADIAL[0]
    length = grid[0] * grid[1] * grid[2]
    blocks = sparse_pattern("radial", grid, decay_factor=decay, block_size=bs, sink=sink).info["block_grid"]
    plan = radial_gather_plan(blocks, bs, length, "cpu")
    q, k, v = (torch.randn(3, length, 2, 8) for _ in range(3))
    whole = gather_attention(q, k, v, plan, chunk_bytes=1 << 30)
    torch.testing.assert_close(gather_attention(q, k, v, plan, chunk_bytes=1), whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gather_attention(q[1:2], k[1:2], v[1:2], plan), whole[1:2], atol=1e-6, rtol=1e-5)


def test_plan_merges_query_blocks_with_the_same_key_set():
    # 4 blocks of 3 tokens; blocks 0 and 2 attend {0, 1}, 1 attends {1}, 3 attends {1, 3}
    kept = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    plan = gather_plan(torch.tensor([0, 3, 6, 9]), torch.tensor([3, 3, 3, 3]), kept, "cpu")
    assert [(b.groups, b.q_len, b.kv_len) for b in plan.buckets] == [(1, 3, 3), (1, 3, 6), (1, 6, 6)]
    merged = plan.buckets[2]
    assert merged.q_index.tolist() == [0, 2] and merged.kv_index.tolist() == [0, 1]  # in runs of unit = 3 tokens
    assert plan.unit == 3 and plan.num_pairs == 3 * 3 + 6 * 6 + 3 * 6
    with pytest.raises(ValueError, match="attend no key block"):
        gather_plan(torch.tensor([0, 3]), torch.tensor([3, 3]), torch.tensor([[1, 0], [0, 0]], dtype=torch.bool), "cpu")


def test_shared_key_sets_follow_the_gather_cost():
    # 5 query blocks over 6 key blocks; rows 0-2 share keys {0, 1, 2}, row 3 shares only {2} with them, row 4 is alone
    kept = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1],
                         [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    sizes = torch.full((5,), 4)
    shared = shared_key_sets(kept, sizes, max_tokens=64)
    # rows 0-2 share {0, 1, 2} (a run of 3: 3 + 1 + 1 + 1 key blocks gathered instead of 12); row 3 would shrink that
    # to {2} (3 * 1 < 2 * 3): a new run, which row 4 joins (2 + 2 + 0 instead of 4 + 2)
    assert shared[:3].tolist() == [[1, 1, 1, 0, 0, 0]] * 3
    assert shared[3:].tolist() == [[0, 0, 0, 0, 1, 1]] * 2
    assert (shared <= kept).all()
    # query blocks with disjoint key sets never share (an empty shared set would leave them without keys)
    disjoint = torch.eye(3, dtype=torch.bool)
    assert torch.equal(shared_key_sets(disjoint, torch.full((3,), 4), max_tokens=64), disjoint)
    # max_tokens caps a run at two query blocks of 4 tokens: runs (0, 1), (2, 3), (4)
    capped = shared_key_sets(kept, sizes, max_tokens=8)
    assert capped.tolist() == [[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 1, 0, 0, 1]] * 2 + [kept[4].tolist()]
    query_sizes = torch.tensor([4, 4, 4, 4, 8])
    plan = gather_plan(torch.arange(6) * 4, torch.full((6,), 4), kept, "cpu", query_starts=torch.cumsum(query_sizes, 0)
                       - query_sizes, query_sizes=query_sizes, share_tokens=64)
    assert plan.split and plan.num_pairs == int((query_sizes[:, None] * kept * 4).sum())
    assert {b.part for b in plan.buckets} == {0, 1}


def test_auto_runs_gather_on_cpu_for_inference_and_training():
    assert choose_impl("radial", "auto", "cpu", needs_grad=False) == "gather"
    assert choose_impl("radial", "auto", "cpu", needs_grad=True) == "gather"
    grid, decay, bs, sink = RADIAL[2]
    length = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, length, 2, 8) for _ in range(3))
    backend = get_backend("radial", "cpu")
    auto = backend.forward(
        q, k, v, AttentionContext(grid, _radial_cfg(decay, bs, sink, "auto"), mask_cache=MaskCache())
    )
    gather = backend.forward(q, k, v, AttentionContext(grid, _radial_cfg(decay, bs, sink), mask_cache=MaskCache()))
    assert torch.equal(auto, gather)


def test_plan_built_once_and_cached():
    grid, tile, window = TILE[0]
    cache = MaskCache()
    ctx = AttentionContext(grid=grid, config=_tile_cfg(tile, window), mask_cache=cache)
    q = torch.randn(1, grid[0] * grid[1] * grid[2], 2, 8)
    backend = get_backend("sliding_tile", "cpu")
    first = backend.forward(q, q, q, ctx)
    misses = cache.misses
    for layer in range(3):
        again = backend.forward(q, q, q, ctx.for_layer(layer))
    assert cache.misses == misses and torch.equal(first, again)


# --------------------------------------------------------------------------------------------------------------------
# Through VideoDiT: 2 layers, latent (3, 14, 18) -> token grid (3, 7, 9) = 189 tokens, not a multiple of the radial
# block (32) nor of the tile (2, 4, 4)
# --------------------------------------------------------------------------------------------------------------------

MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
LATENT = (3, 14, 18)
MODEL_CONFIGS = {
    "radial": dict(radial=RadialConfig(decay_factor=1.0, block_size=32, sink=True)),
    "sliding_tile": dict(sliding_tile=SlidingTileConfig(tile=(2, 4, 4), window=(1, 2, 2))),
}


@pytest.mark.parametrize("method", list(MODEL_CONFIGS))
def test_gather_equals_reference_through_model(method):
    """Forward output and every parameter gradient of a 2-layer VideoDiT: impl=gather vs impl=reference."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, MODEL["in_channels"], *LATENT, generator=g)
    t = torch.rand(2, generator=g) * 1000
    text = torch.randn(2, 5, MODEL["text_dim"], generator=g)
    target = torch.randn(x.shape, generator=g)
    results = {}
    for impl in ("gather", "reference"):
        torch.manual_seed(0)
        model = VideoDiT(**MODEL)
        cfg = AttentionConfig(backend=method, impl=impl, **MODEL_CONFIGS[method])
        stats = AttentionStats()
        out = model(x, t, text, attention_kwargs={"attention": cfg, "stats": stats, "mask_cache": MaskCache()}).sample
        torch.nn.functional.mse_loss(out, target).backward()
        assert stats.by_backend == {method: MODEL["num_layers"]} and stats.density < 0.9
        results[impl] = (out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (out_g, grads_g), (out_r, grads_r) = results["gather"], results["reference"]
    assert (out_g - out_r).abs().max() < 1e-5
    assert grads_g.keys() == grads_r.keys() and len(grads_g) > 10
    for name in grads_r:
        torch.testing.assert_close(grads_g[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=name)
