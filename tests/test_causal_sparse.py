"""Long video with sparse attention: radial and sliding tile restricted to the chunks a query chunk attends (the last
chunk's rows of the method's pattern over the clip of its attended chunks), through the uncached forward and the
causal KV cache; VMoBA refuses with its reason (tiny random-weight models, fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vdiff.attention import AttentionContext, MaskCache, get_backend
from vdiff.attention.dense import reference_attention
from vdiff.cache import CausalKVCacheConfig
from vdiff.config import AttentionConfig, CausalConfig, RadialConfig, SlidingTileConfig, model_preset
from vdiff.pipeline import PipelineConfig, VideoPipeline

PROMPT = "a red circle moving right"
SPARSE = {
    "radial": AttentionConfig(backend="radial", radial=RadialConfig(block_size=16, decay_factor=0.5)),
    "sliding_tile": AttentionConfig(backend="sliding_tile",
                                    sliding_tile=SlidingTileConfig(tile=(2, 2, 2), window=(3, 1, 3))),
}


def _square(name, cfg, q, k, v, grid):
    """The method's own square attention over `grid` (tokens handed over in its token order, as the model does)."""
    backend = get_backend(name, "cpu")
    perm = backend.token_order(grid, cfg)
    ctx = AttentionContext(grid=grid, config=cfg)
    if perm is None:
        return backend.forward(q, k, v, ctx)
    return backend.forward(q[:, perm], k[:, perm], v[:, perm], ctx)[:, torch.argsort(perm)]


@pytest.mark.parametrize("impl", ["gather", "reference", "fast"])
@pytest.mark.parametrize("name", sorted(SPARSE))
@torch.no_grad()
def test_block_causal_call_is_the_last_chunk_of_the_clip(name, impl):
    """One chunk's queries over 3 chunks' keys == the last chunk's rows of the square sparse attention over the
    3-chunk clip (tested against its float64 reference elsewhere), and the pattern really is sparse there; for every
    implementation (fast = compiled FlexAttention with a [Lq, Lk] BlockMask, forward on CPU)."""
    cfg = dataclasses.replace(SPARSE[name], impl=impl)
    frames, h, w, chunks = 2, 4, 6, 3
    n = frames * h * w
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, chunks * n, 2, 16, generator=g) for _ in range(3))
    want = _square(name, dataclasses.replace(cfg, impl="reference"), q, k, v, (chunks * frames, h, w))[:, -n:]
    ctx = AttentionContext(grid=(frames, h, w), config=cfg, key_frames=chunks * frames, stats=None)
    backend = get_backend(name, "cpu")
    out, info = backend.attend(q[:, -n:], k, v, ctx)
    assert info.impl == impl
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    dense = reference_attention(q[:, -n:], k, v)
    assert (out - dense).abs().max() > 1e-3  # the method dropped keys: not dense attention
    rows = backend._tail_rows((chunks * frames, h, w), backend.options(cfg), frames)
    assert rows.shape == (n, chunks * n) and 0.2 < rows.float().mean() < 0.95


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_block_causal_gather_backward_matches_reference(name):
    """Training a causal model with a sparse backend: the gather path's gradients over a block-causal call equal the
    masked-SDPA reference's."""
    frames, h, w, chunks = 2, 4, 6, 3
    n = frames * h * w
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(1, s, 2, 16, generator=g) for s in (n, chunks * n, chunks * n)]
    grads = {}
    for impl in ("gather", "reference"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        ctx = AttentionContext(grid=(frames, h, w), config=dataclasses.replace(SPARSE[name], impl=impl),
                               key_frames=chunks * frames)
        out = get_backend(name, "cpu").forward(q, k, v, ctx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[impl] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["gather"], grads["reference"]):
        assert b.abs().max() > 1e-4
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _pipe(attention, cache=("text_kv", "causal_kv"), rope="window"):
    cfg = model_preset("tiny", num_layers=2, causal=CausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=2,
                                                                   rope=rope))
    config = PipelineConfig(num_frames=8, height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                            cache=list(cache), context_noise=0.1, attention=attention)
    return VideoPipeline.from_model_config(cfg, config=config)


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_cached_stream_equals_full_recompute(name):
    """causal_kv with a sparse backend == the uncached block-causal forward over the whole history (same masks:
    both see each chunk's call as the last chunk of its attended chunks), past the window (eviction) and with CFG;
    and the sparse stream is not the dense one."""
    pipe = _pipe(SPARSE[name])
    cached = [c.latents for c in pipe.stream(PROMPT, seed=3, num_chunks=5)]
    reference = [c.latents for c in pipe.stream(PROMPT, seed=3, num_chunks=5, cache=["text_kv"])]
    dense = [c.latents for c in _pipe(AttentionConfig()).stream(PROMPT, seed=3, num_chunks=5)]
    for c, (x, y) in enumerate(zip(cached, reference)):
        assert x.abs().max() > 0.1
        assert (x - y).abs().max() <= 1e-5, (c, float((x - y).abs().max()))
    assert max(float((x - d).abs().max()) for x, d in zip(cached, dense)) > 1e-4


def test_vmoba_and_external_split_refuse_a_sparse_causal_model():
    pipe = _pipe(AttentionConfig(backend="vmoba"))
    with pytest.raises(ValueError, match="vmoba' does not run a causal model.*dense, radial or sliding_tile"):
        next(pipe.stream(PROMPT, seed=0, num_chunks=2))
    pipe = _pipe(SPARSE["radial"])
    with pytest.raises(ValueError, match="external='split' splits dense attention.*use external='off'"):
        list(pipe.stream(PROMPT, seed=0, num_chunks=2, cache=["text_kv", CausalKVCacheConfig(external="split")]))


def test_tail_masks_built_once_per_key_grid():
    """The trainer / pipeline mask cache holds one row pattern per (key grid, query frames, options) and impl."""
    cache = MaskCache()
    frames, h, w = 2, 4, 6
    g = torch.Generator().manual_seed(2)
    for kf in (2, 4, 6, 6, 4):
        q = torch.randn(1, frames * h * w, 2, 16, generator=g)
        k, v = (torch.randn(1, kf * h * w, 2, 16, generator=g) for _ in range(2))
        ctx = AttentionContext(grid=(frames, h, w), config=SPARSE["radial"], key_frames=kf, mask_cache=cache)
        get_backend("radial", "cpu").forward(q, k, v, ctx)
    assert len(cache) == 6 and cache.misses == 6  # 3 key grids x (rows, gather plan), each built once
