"""VMoBA: selection against an independent per-query brute force, gather == reference == float64 masked attention
(forward and backward) for every partition and selection mode, and the dense limits. The FlexAttention path is
tested in test_attention_vmoba_flex.py (it compiles)."""

import math

import pytest
import torch

from vdiff.attention import AttentionContext, AttentionStats, available, dispatch, sparse_pattern, vmoba
from vdiff.attention.dense import reference_attention, sdpa_attention
from vdiff.attention.vmoba import chunk_layout, vmoba_options
from vdiff.config import AttentionConfig, VMoBAConfig

GRID = (5, 6, 7)  # 210 tokens: no chunk size below divides it evenly
CHUNKS = dict(chunk_t=2, chunk_hw=(4, 4), chunk_thw=(2, 4, 3))  # 3 / 4 / 18 chunks on GRID, all with partial edges
VARIANTS = {
    "topk": dict(select="topk", topk=2),
    "threshold": dict(select="threshold", threshold=0.5),
    "topk-global": dict(select="topk", topk=2, global_select=True),
    "threshold-global": dict(select="threshold", threshold=0.5, global_select=True),
}


def _qkv(grid=GRID, batch=1, heads=2, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    L = math.prod(grid)
    return [torch.randn(batch, L, heads, dim, generator=g, dtype=dtype) for _ in range(3)]


def _chunk_ids(grid, layer, opts):
    """Chunk of every frame-major token from its (t, h, w) coordinates: written independently of the module."""
    T, H, W = grid
    if layer % 3 == 0:
        ext = (opts["chunk_t"], H, W)
    elif layer % 3 == 1:
        ext = (T, *opts["chunk_hw"])
    else:
        ext = opts["chunk_thw"]
    keys, ids = {}, []
    for t in range(T):
        for h in range(H):
            for w in range(W):
                ids.append(keys.setdefault((t // ext[0], h // ext[1], w // ext[2]), len(keys)))
    return torch.tensor(ids)


def _brute_force_mask(q, k, grid, layer, opts):
    """[H, L, L] selected pairs for batch 0 by the algorithm, one query at a time (plain Python lists)."""
    ids = _chunk_ids(grid, layer, opts)
    C, L = int(ids.max()) + 1, ids.numel()
    H, D = q.shape[2], q.shape[3]
    masks = []
    for h in range(H):
        qh, kh = q[0, :, h].double(), k[0, :, h].double()
        means = torch.stack([kh[ids == c].mean(0) for c in range(C)])  # [C, D]
        gate = qh @ means.T  # [L, C]
        share = torch.softmax(gate / math.sqrt(D), dim=-1)
        # candidates: own chunk first, then by descending gate
        cands = [sorted(range(C), key=lambda c, i=i: (c != int(ids[i]), -float(gate[i, c]))) for i in range(L)]
        chosen = torch.zeros(L, C, dtype=torch.bool)
        if opts.get("global_select"):
            pooled = sorted(((i, c) for i in range(L) for c in range(C)),
                            key=lambda p: (p[1] != int(ids[p[0]]), -float(gate[p])))
            if opts["select"] == "topk":
                pooled = pooled[: opts["topk"] * L]
            else:
                taken, keep = 0.0, []
                for p in pooled:
                    if taken >= opts["threshold"] * L:
                        break
                    keep.append(p)
                    taken += float(share[p])
                pooled = keep
            for i, c in pooled:
                chosen[i, c] = True
        else:
            for i in range(L):
                if opts["select"] == "topk":
                    picked = cands[i][: opts["topk"]]
                else:
                    picked, taken = [], 0.0
                    for c in cands[i]:
                        if taken >= opts["threshold"]:
                            break
                        picked.append(c)
                        taken += float(share[i, c])
                chosen[i, picked] = True
        chosen[torch.arange(L), ids] = True  # own chunk always
        masks.append(chosen[:, ids])  # [L, L]
    return torch.stack(masks)


def _ctx(opts, layer, impl, grid=GRID):
    cfg = AttentionConfig(backend="vmoba", impl=impl, vmoba=vmoba_options(**opts))
    return AttentionContext(grid=grid, config=cfg, layer=layer)


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_selection_matches_brute_force(layer, variant):
    opts = {**CHUNKS, **VARIANTS[variant]}
    q, k, _ = _qkv(heads=2, seed=layer)
    pattern = sparse_pattern("vmoba", GRID, q=q, k=k, layer=layer, **opts)
    want = _brute_force_mask(q, k, GRID, layer, opts)
    got = pattern.mask()
    assert got.shape == want.shape == (2, 210, 210)
    assert torch.equal(got, want)
    assert pattern.density == pytest.approx(want.float().mean().item(), abs=1e-6)
    assert 0.0 < pattern.density < 1.0  # a real sparse selection, neither empty nor dense


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gather_and_reference_compute_exactly_the_pattern(layer, variant):
    """gather and reference paths == float64 attention restricted to `sparse_pattern(...).mask()`, forward and grads."""
    opts = {**CHUNKS, **VARIANTS[variant]}
    q, k, v = _qkv(heads=2, seed=10 + layer)
    mask = sparse_pattern("vmoba", GRID, q=q, k=k, layer=layer, **opts).mask()  # [H, L, L]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = reference_attention(q64, k64, v64, mask)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out)
    dense = reference_attention(q, k, v)
    assert (want - dense.double()).abs().max() > 1e-2  # the mask really changes the result

    for impl in ("gather", "reference"):
        qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
        ctx = _ctx(opts, layer, impl)
        ctx.stats = AttentionStats()
        out = dispatch(qi, ki, vi, ctx)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4, msg=f"{impl} forward")
        grads = torch.autograd.grad(out, (qi, ki, vi), grad_out.float())
        for name, g, w in zip("qkv", grads, want_grads):
            torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-4, msg=f"{impl} d{name}")
        assert ctx.stats.by_impl == {f"vmoba:{impl}": 1}  # the call ran the path asked for
        assert ctx.stats.density == pytest.approx(mask.float().mean().item(), abs=1e-6)


def test_gather_batch_and_heads_are_independent(monkeypatch):
    """Batch > 1: each batch element gets its own selection; gather == reference on all of them."""
    opts = {**CHUNKS, "select": "threshold", "threshold": 0.4}
    q, k, v = _qkv(batch=3, heads=3, seed=4)
    fast = dispatch(q, k, v, _ctx(opts, 2, "gather"))
    ref = dispatch(q, k, v, _ctx(opts, 2, "reference"))
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    # many tiles per (batch, head, chunk) group and many matmul batches: the same result
    monkeypatch.setattr(vmoba, "_TILE_BATCH_ELEMENTS", 16 * 64)
    layout = chunk_layout(GRID, vmoba.chunk_shape(vmoba_options(**opts), "3d", GRID), "cpu")
    sel = vmoba.select_chunks(q, k, layout, vmoba_options(**opts))
    torch.testing.assert_close(vmoba.vmoba_gather(q, k, v, sel, layout, query_tile=16), ref, atol=2e-5, rtol=1e-4)
    for b in range(3):  # batch element b alone gives the same rows
        alone = dispatch(q[b:b + 1], k[b:b + 1], v[b:b + 1], _ctx(opts, 2, "gather"))
        torch.testing.assert_close(fast[b:b + 1], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_topk_one_is_exactly_the_own_chunk(layer):
    """topk=1 keeps only the own chunk (even where another chunk has a larger gate): a block-diagonal mask."""
    opts = {**CHUNKS, "select": "topk", "topk": 1}
    q, k, v = _qkv(seed=7)
    ids = _chunk_ids(GRID, layer, opts)
    want = (ids[:, None] == ids[None, :]).expand(2, -1, -1)
    assert torch.equal(sparse_pattern("vmoba", GRID, q=q, k=k, layer=layer, **opts).mask(), want)
    out = dispatch(q, k, v, _ctx(opts, layer, "gather"))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, want), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_own_chunk_always_attended(variant):
    """Even at the smallest budgets (threshold 0.01, topk 1) every query attends its own chunk."""
    opts = {**CHUNKS, **VARIANTS[variant], "threshold": 0.01, "topk": 1}
    q, k, _ = _qkv(seed=3)
    k = -k  # flip the keys so the own chunk is often a poor match
    for layer in range(3):
        ids = _chunk_ids(GRID, layer, opts)
        mask = sparse_pattern("vmoba", GRID, q=q, k=k, layer=layer, **opts).mask()
        own = ids[:, None] == ids[None, :]
        assert mask[:, own].all()


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("opts", [dict(select="threshold", threshold=1.0),
                                  dict(select="threshold", threshold=1.0, global_select=True),
                                  dict(select="topk", topk=18), dict(select="topk", topk=50, global_select=True)],
                         ids=["threshold1", "threshold1-global", "topk-all", "topk-all-global"])
def test_full_budget_is_dense(layer, opts):
    opts = {**CHUNKS, **opts}
    q, k, v = _qkv(seed=5)
    pattern = sparse_pattern("vmoba", GRID, q=q, k=k, layer=layer, **opts)
    assert pattern.density == 1.0 and pattern.mask().all()
    want = sdpa_attention(q, k, v)
    for impl in ("gather", "reference"):
        torch.testing.assert_close(dispatch(q, k, v, _ctx(opts, layer, impl)), want, atol=2e-5, rtol=1e-4)


def test_chunk_layout_partial_edges():
    """3D chunks (2, 2, 3) on grid (3, 5, 5): 2 x 3 x 2 = 12 chunks; sizes from the clipped extents."""
    layout = chunk_layout((3, 5, 5), (2, 2, 3), "cpu")
    assert layout.num_chunks == 12
    want_sizes = [ct * ch * cw for ct in (2, 1) for ch in (2, 2, 1) for cw in (3, 2)]
    assert layout.sizes.tolist() == want_sizes
    for c in range(12):  # every chunk's token list is exactly the tokens labelled c
        members = layout.tokens[c][layout.valid[c]]
        assert torch.equal(members, (layout.chunk_of == c).nonzero().flatten())


def test_density_table_and_errors():
    q, k, _ = _qkv(grid=(4, 8, 8), heads=2, seed=1)
    dens = [sparse_pattern("vmoba", (4, 8, 8), q=q, k=k, layer=layer, chunk_t=1, chunk_hw=(4, 4),
                           chunk_thw=(2, 4, 4), topk=2).density for layer in range(3)]
    # 1D: 4 frame chunks of 64 -> exactly 2/4; 2D: 4 patches of 64 -> 2/4; 3D: 8 cubes of 32 -> 2/8
    assert dens == pytest.approx([0.5, 0.5, 0.25])
    with pytest.raises(ValueError, match="attention.vmoba.topk"):
        sparse_pattern("vmoba", (4, 8, 8), q=q, k=k, topk=0)
    with pytest.raises(ValueError, match="attention.vmoba.threshold"):
        sparse_pattern("vmoba", (4, 8, 8), q=q, k=k, select="threshold", threshold=1.5)
    with pytest.raises(ValueError, match="unknown option"):
        sparse_pattern("vmoba", (4, 8, 8), q=q, k=k, chunk=3)
    with pytest.raises(ValueError, match="pass q and k"):
        sparse_pattern("vmoba", (4, 8, 8))
    with pytest.raises(ValueError, match="grid"):
        dispatch(q, k, k, AttentionContext(grid=(4, 8, 9), config=AttentionConfig(backend="vmoba")))
    status = available("cpu")["vmoba"]
    assert status.available and status.backward
    assert VMoBAConfig().select in ("topk", "threshold")
