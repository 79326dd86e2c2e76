"""VMoBA's FlexAttention path: the block mask computes exactly `sparse_pattern("vmoba", ...).mask()` (token level,
every partition, topk and threshold selection), its forward equals float64 masked attention on CPU, and impl
selection says which path runs where (CPU: flex forward only, via impl=fast; auto runs gather there). One small
shape, so compiled Flex compiles once for the whole file (the selection is padded to the same chunk count for every
layer)."""

import math

import pytest
import torch

from vdiff.attention import (
    AttentionContext,
    AttentionStats,
    BackendUnavailable,
    dispatch,
    get_backend,
    policy,
    sparse_pattern,
    vmoba,
    vmoba_flex,
)
from vdiff.attention.dense import reference_attention
from vdiff.attention.vmoba import vmoba_options
from vdiff.config import AttentionConfig

GRID = (4, 12, 10)  # 480 tokens: 7.5 CPU kernel blocks of 64; no chunk size below divides the grid evenly
CHUNKS = dict(chunk_t=1, chunk_hw=(5, 4), chunk_thw=(2, 5, 4))  # 4 / 9 / 18 chunks, partial edges on 2D and 3D
VARIANTS = {
    "topk": dict(select="topk", topk=2),
    "threshold": dict(select="threshold", threshold=0.3),
}


def _qkv(seed, batch=2, heads=2, dim=16, device="cpu", noise=0.1):
    """q, k, v [B, L, H, D]: a field that varies smoothly over (t, h, w) (cells of 4 x 4 x 5 tokens, not aligned with
    the chunks) plus per-token noise, so neighbouring queries tend to pick the same chunks, as in real video."""
    g = torch.Generator().manual_seed(seed)
    T, H, W = GRID
    coarse = torch.randn(3, batch, 1, 3, 2, heads, dim, generator=g)  # [3, B, T/4, H/4, W/5, heads, D]
    field = coarse.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(5, 4)
    field = field.reshape(3, batch, T * H * W, heads, dim)
    return [(f + noise * torch.randn(f.shape, generator=g)).to(device) for f in field]


def _ctx(opts, layer, impl):
    cfg = AttentionConfig(backend="vmoba", impl=impl, vmoba=vmoba_options(**opts))
    return AttentionContext(grid=GRID, config=cfg, layer=layer)


def _computed_pairs(block_mask, flex, q_order, batch, length):
    """BoolTensor [H, L, L] over frame-major tokens: the pairs the kernel computes for batch element `batch`:
    every pair of a full block, and the pairs of a partial block where mask_mod is True (read from the BlockMask's
    own index lists, independently of how they were built)."""
    bs, n = flex.block_size, flex.num_blocks
    heads = block_mask.kv_num_blocks.shape[1]
    grids = {}
    for kind, counts, indices in (("partial", block_mask.kv_num_blocks, block_mask.kv_indices),
                                  ("full", block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        grid = torch.zeros(heads, n, n, dtype=torch.int64)
        for h in range(heads):
            for qb in range(n):
                listed = indices[batch, h, qb, :counts[batch, h, qb]].long()
                grid[h, qb].index_add_(0, listed, torch.ones_like(listed))
        grids[kind] = grid
    assert int((grids["partial"] + grids["full"]).max()) <= 1  # each block listed at most once
    pos = torch.arange(n * bs)
    mod = block_mask.mask_mod(torch.tensor(batch), torch.arange(heads)[:, None, None], pos[None, :, None],
                              pos[None, None, :])  # [H, n*bs, n*bs]
    up = lambda g: g.bool().repeat_interleave(bs, 1).repeat_interleave(bs, 2)  # noqa: E731
    computed = (up(grids["full"]) | (up(grids["partial"]) & mod))[:, :length, :length]  # never past L
    out = torch.zeros_like(computed)  # back to frame-major: rows through q_order, columns through the key order
    for h in range(heads):
        out[h, q_order[batch, h][:, None], flex.order[None, :]] = computed[h]
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_block_mask_is_exactly_the_pattern(variant):
    """For each partition, the BlockMask + mask_mod compute exactly `.mask()`; blocks are really skipped, and the
    block densities in `.info` are the ones of this block mask."""
    opts = {**CHUNKS, **VARIANTS[variant]}
    cfg = vmoba_options(**opts)
    length = math.prod(GRID)
    for layer in range(3):
        q, k, _ = _qkv(seed=layer)
        layout = vmoba.chunk_layout(GRID, vmoba.chunk_shape(cfg, vmoba.partition_for_layer(layer), GRID), "cpu")
        flex = vmoba_flex.flex_layout(layout, vmoba_flex.flex_block_size("cpu"), vmoba_flex.max_chunks(GRID, cfg))
        sel = vmoba.select_chunks(q, k, layout, cfg)
        q_order = vmoba_flex.query_order(sel)
        block_mask = vmoba_flex.vmoba_block_mask(sel, flex, q_order)
        for b in range(2):
            pattern = sparse_pattern("vmoba", GRID, q=q[b:b + 1], k=k[b:b + 1], layer=layer, **opts)
            want = pattern.mask()  # [H, L, L]
            got = _computed_pairs(block_mask, flex, q_order, b, length)
            assert torch.equal(got, want), f"layer {layer} batch {b}"
            assert got.float().mean().item() == pytest.approx(pattern.density, abs=1e-7)
            assert 0.0 < pattern.density < 1.0
            visited = (block_mask.to_dense()[b] > 0)  # [H, N, N]
            assert pattern.info["block_density"] == pytest.approx(visited.float().mean().item(), abs=1e-7)
            assert pattern.info["flex_block_size"] == 64
            assert pattern.density <= pattern.info["block_pair_density"] <= 1.0
        assert int(block_mask.kv_num_blocks.sum()) > 0  # partial blocks: the kernel evaluates mask_mod there
        if layer == 0:  # frames of 120 tokens: blocks inside the own frame run without mask_mod
            assert int(block_mask.full_kv_num_blocks.sum()) > 0
        if variant == "topk":  # some whole blocks are skipped
            assert pattern.info["block_density"] < 0.95


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flex_forward_equals_reference_on_cpu(variant):
    """impl=fast runs flex on CPU without grad (impl=auto runs gather there): both == float64 attention restricted
    to `.mask()`, and the density the backend reports is the pattern's."""
    opts = {**CHUNKS, **VARIANTS[variant]}
    for layer in range(3):
        q, k, v = _qkv(seed=10 + layer)
        patterns = [sparse_pattern("vmoba", GRID, q=q[b:b + 1], k=k[b:b + 1], layer=layer, **opts) for b in range(2)]
        want = torch.cat([reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], patterns[b].mask())
                          for b in range(2)])
        assert (want - reference_attention(q, k, v)).abs().max() > 1e-2  # the selection really changes the output
        for impl, path in (("fast", "fast"), ("auto", "gather")):
            ctx = _ctx(opts, layer, impl)
            ctx.stats = AttentionStats()
            with torch.no_grad():
                out = dispatch(q, k, v, ctx)
            assert ctx.stats.by_impl == {f"vmoba:{path}": 1}
            torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4, msg=f"layer {layer} {impl}")
            assert ctx.stats.density == pytest.approx(sum(p.density for p in patterns) / 2, abs=1e-6)


def test_cpu_training_runs_gather_and_fast_raises(monkeypatch):
    """On CPU, compiled Flex has no backward: auto trains through gather (same pairs, with grads), fast raises."""
    opts = {**CHUNKS, **VARIANTS["topk"]}
    q, k, v = (t.requires_grad_() for t in _qkv(seed=3))
    backend = get_backend("vmoba")
    ctx = _ctx(opts, 2, "auto")
    ctx.stats = AttentionStats()
    out = dispatch(q, k, v, ctx)
    assert ctx.stats.by_impl == {"vmoba:gather": 1}
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        dispatch(q, k, v, _ctx(opts, 2, "fast"))
    assert backend.implementation("auto", "cpu", needs_grad=False) == "gather"  # measured faster on CPU
    assert backend.implementation("fast", "cpu", needs_grad=False) == "fast"
    monkeypatch.setattr(policy, "AUTO_FAST_ON_CPU", True)
    assert backend.implementation("auto", "cpu", needs_grad=False) == "fast"
    assert backend.implementation("auto", "cpu", needs_grad=True) == "gather"
    assert backend.implementation("reference", "cpu", needs_grad=True) == "reference"
    with pytest.raises(ValueError, match="attention.impl"):
        backend.implementation("quick")


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_flex_backward_equals_reference_on_gpu(layer):
    """GPU: the flex path (compiled Flex has a backward there) == explicit-mask reference, forward and grads."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    opts = {**CHUNKS, **VARIANTS["topk"]}
    q, k, v = _qkv(seed=20 + layer, heads=4, dim=64, device="cuda")
    grad_out = torch.randn_like(q)
    results = {}
    for impl in ("fast", "reference"):
        qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
        ctx = _ctx(opts, layer, impl)
        ctx.stats = AttentionStats()
        out = dispatch(qi, ki, vi, ctx)
        assert ctx.stats.by_impl == {f"vmoba:{impl}": 1}
        grads = torch.autograd.grad(out, (qi, ki, vi), grad_out)
        results[impl] = (out, *grads)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["fast"], results["reference"]):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3, msg=name)
