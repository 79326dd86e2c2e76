"""Inference caches: exact ones change nothing, the step cache skips what it says, hooks come off cleanly."""

from __future__ import annotations

import pytest
import torch

from vdiff.cache import (
    MaskCacheConfig,
    PromptCacheConfig,
    StepCacheConfig,
    TextKVCacheConfig,
    apply_prompt_cache,
    apply_step_cache,
    cache_context,
    remove_step_cache,
)
from vdiff.cache.hooks import has_hook
from vdiff.config import AttentionConfig, model_preset
from vdiff.models.dit import VideoDiT, VideoDiTBlock
from vdiff.pipeline import PipelineConfig, VideoPipeline

SMALL = dict(num_frames=4, height=16, width=16, num_inference_steps=4)  # 16 tokens


@pytest.fixture(scope="module")
def pipe() -> VideoPipeline:
    cfg = PipelineConfig(num_frames=4, height=16, width=16, text_max_length=16, cache=[])
    return VideoPipeline.from_model_config(model_preset("tiny", num_layers=3), config=cfg, seed=0)


def run(pipe, cache, prompt="a red circle moving right", **kw):
    seen = {}
    out = pipe(prompt, seed=4, cache=cache, callback=lambda i, n, x: seen.__setitem__("x", x.clone()),
               **{**SMALL, **kw})
    return seen["x"], out


def test_text_kv_is_exact_and_reuses_every_projection(pipe):
    ref, _ = run(pipe, [])
    got, out = run(pipe, ["text_kv"])
    assert (got - ref).abs().max() <= 1e-6
    # computed once (step 0), reused at steps 1..3: text projection + 3 layers x (to_k, norm_k, to_v)
    per_step = 1 + 3 * 3
    assert out.stats.cache["text_kv"] == {"misses": per_step, "hits": 3 * per_step}


def test_text_kv_is_per_call(pipe):
    """A second call with another prompt must not see the first call's K/V."""
    run(pipe, ["text_kv"], prompt="a red circle")
    ref, _ = run(pipe, [], prompt="a blue square")
    got, out = run(pipe, ["text_kv"], prompt="a blue square")
    assert (got - ref).abs().max() <= 1e-6 and out.stats.cache["text_kv"]["misses"] == 10


def test_text_kv_remembers_two_texts():
    """Switch guidance alternates the new and the old prompt at every step: both stay cached (hits, exact), and a
    third text pushes out the one used least recently."""
    from vdiff.cache import apply_text_kv_cache

    torch.manual_seed(0)
    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=2, in_channels=12, out_channels=12,
                                                    text_dim=16)).eval()
    x, t = torch.randn(1, 12, 2, 4, 4), torch.tensor([500.0])
    a, b, c = (torch.randn(1, 5, 16) for _ in range(3))
    with torch.no_grad():
        ref = {k: model(x, t, e).sample for k, e in (("a", a), ("b", b), ("c", c))}
        apply_text_kv_cache(model)
        with cache_context(enabled={"text_kv"}) as call:
            outs = [(k, model(x, t, e).sample) for k, e in (("a", a), ("b", b), ("a", a), ("b", b))]
        with cache_context(enabled={"text_kv"}) as third:
            for e in (a, b, c, a):  # c evicts a
                model(x, t, e)
    per = 1 + 2 * 3  # text projection + 2 layers x (to_k, norm_k, to_v)
    assert call.stats["text_kv"] == {"misses": 2 * per, "hits": 2 * per}
    assert all((out - ref[k]).abs().max() <= 1e-6 for k, out in outs)
    assert third.stats["text_kv"] == {"misses": 4 * per}


def test_mask_cache_builds_once_per_grid_and_is_exact(pipe):
    # radial through its reference path (explicit mask): 8 frames x 4 x 4 = 128 tokens, block 16
    att = AttentionConfig(backend="radial", impl="reference")
    att.radial.block_size = 16
    kw = dict(num_frames=8, height=32, width=32, num_inference_steps=3, attention=att)
    ref, uncached = run(pipe, [], **kw)
    pipe.enable_cache(MaskCacheConfig(shared=False, max_entries=8))
    try:
        got, first = run(pipe, ["mask"], **kw)
        _, second = run(pipe, ["mask"], **kw)
    finally:
        pipe.disable_cache("mask")
    assert (got - ref).abs().max() <= 1e-6
    built = first.stats.cache["mask"]["misses"]
    requests = built + first.stats.cache["mask"]["hits"]
    assert 1 <= built <= 6  # the grid's mask and its helpers, built once ...
    assert requests >= 3 * 3  # ... asked for by 3 layers x 3 steps
    # without the cache every request builds (and builders' own requests for helpers build again)
    assert set(uncached.stats.cache["mask"]) == {"misses"} and uncached.stats.cache["mask"]["misses"] >= requests
    assert set(second.stats.cache["mask"]) == {"hits"}  # reused across calls: nothing rebuilt
    assert first.stats.attention.density < 1.0  # it was really sparse


def test_uncached_sampling_rebuilds_masks(pipe):
    from vdiff.cache import cache_context, no_mask_cache

    with cache_context() as call:
        view = no_mask_cache(call)
        for _ in range(3):
            view.get_or_build(("k",), lambda: torch.ones(2))
    assert call.stats["mask"] == {"misses": 3}


def test_step_cache_zero_threshold_is_exact(pipe):
    ref, _ = run(pipe, [])
    got, out = run(pipe, [StepCacheConfig(threshold=0.0)])
    assert (got - ref).abs().max() <= 1e-6 and out.stats.cache["step"]["computed"] == 4


def test_step_cache_skips_and_reports(pipe):
    ref, base = run(pipe, [])
    got, out = run(pipe, [StepCacheConfig(threshold=1e9, warmup_steps=2)])
    st = out.stats.cache["step"]
    assert st["computed"] == 2 and st["skipped"] == 2 and len(st["changes"]) == 2
    assert out.stats.attention.calls == 2 * 3 + 2 * 1  # skipped steps run only the first block
    assert torch.isfinite(got).all() and (got - ref).abs().max() > 1e-4  # approximate, and says so
    got2, out2 = run(pipe, [StepCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive_skips=1)])
    # 0 full, 1 skipped, 2 full (forced after one skip), 3 skipped
    assert out2.stats.cache["step"]["computed"] == 2 and out2.stats.cache["step"]["skipped"] == 2


def test_modulated_input_indicator_zero_threshold_is_exact(pipe):
    ref, _ = run(pipe, [])
    got, out = run(pipe, [StepCacheConfig(threshold=0.0, indicator="modulated_input")])
    st = out.stats.cache["step"]
    assert (got - ref).abs().max() <= 1e-6 and st["computed"] == 4 and st["pattern"] == "FFFF"
    assert len(st["changes"]) == 3 and min(st["changes"]) > 0


def test_modulated_input_indicator_skips_every_block_and_follows_its_rule(pipe):
    ref, base = run(pipe, [])
    got, out = run(pipe, [StepCacheConfig(threshold=1e9, warmup_steps=2, indicator="modulated_input")])
    st = out.stats.cache["step"]
    assert st["pattern"] == "FFSS"
    assert out.stats.attention.calls == 2 * 3  # skipped steps run no block at all
    assert torch.isfinite(got).all() and (got - ref).abs().max() > 1e-4  # approximate, and says so
    # the summed-change rule, replayed on the recorded changes at a threshold between them
    got, out = run(pipe, [StepCacheConfig(threshold=0.0, indicator="modulated_input")], num_inference_steps=8)
    changes = out.stats.cache["step"]["changes"]  # 7: steps 1..7 vs the step before
    threshold = sorted(changes)[3] * 1.5
    _, out = run(pipe, [StepCacheConfig(threshold=threshold, indicator="modulated_input")], num_inference_steps=8)
    st = out.stats.cache["step"]
    expected, acc = "F", 0.0
    for c in st["changes"]:  # changes vs the previous step: the same inputs until the first skip, then replayed
        skip = acc + c <= threshold
        acc = acc + c if skip else 0.0
        expected += "S" if skip else "F"
    assert st["pattern"] == expected and "S" in expected and "F" in expected[1:]


@pytest.mark.parametrize("indicator", ["first_block", "modulated_input"])
def test_step_cache_reuses_the_stored_residual_exactly(indicator):
    """Same input twice: the skipped forward returns the full forward's output (first_block: block 0 runs and the
    tail residual is added; modulated_input: no block runs and the whole stack's residual is added); a changed
    input recomputes; outside a call scope the hooks pass through."""
    torch.manual_seed(0)
    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=3, in_channels=12, out_channels=12,
                                                    text_dim=16)).eval()
    x = torch.randn(1, 12, 2, 4, 4)
    x2 = torch.randn(1, 12, 2, 4, 4) * 3
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 5, 16)
    with torch.no_grad():
        ref1, ref2 = model(x, t, ctx).sample, model(x2, t, ctx).sample
        apply_step_cache(model, StepCacheConfig(threshold=0.01, indicator=indicator))
        with cache_context() as call:
            full = model(x, t, ctx, attention_kwargs={"step": 0}).sample
            reused = model(x, t, ctx, attention_kwargs={"step": 1}).sample
            changed = model(x2, t, ctx, attention_kwargs={"step": 2}).sample
        outside = model(x2, t, ctx).sample  # no call scope: pass-through
        remove_step_cache(model)
    st = call.stats["step"]
    assert st["computed"] == 2 and st["skipped"] == 1 and st["pattern"] == "FSF" and st["changes"][0] == 0.0
    assert (full - ref1).abs().max() <= 1e-6 and (reused - ref1).abs().max() <= 1e-5
    assert (changed - ref2).abs().max() <= 1e-6 and torch.equal(outside, ref2)


def test_step_cache_rejects_an_unknown_indicator():
    with pytest.raises(ValueError, match="indicator must be one of"):
        StepCacheConfig(indicator="timestep")


def test_prompt_cache_lru_across_calls(pipe):
    ref, _ = run(pipe, [], prompt="a yellow star moving down")
    got, first = run(pipe, ["prompt"], prompt="a yellow star moving down")
    _, second = run(pipe, ["prompt"], prompt="a yellow star moving down")
    assert (got - ref).abs().max() <= 1e-5
    assert first.stats.cache["prompt"]["misses"] >= 1  # the prompt (the "" negative may be cached already)
    assert second.stats.cache["prompt"] == {"hits": 2, "misses": 0}  # prompt + negative prompt


def test_prompt_cache_evicts_least_recent(pipe):
    from vdiff.models.text import minilm_text_encoder

    enc = minilm_text_encoder(max_length=8)
    ref = enc.encode(["a", "b", "c"])
    apply_prompt_cache(enc, PromptCacheConfig(max_entries=2))
    hook = enc._diffusers_hook.get_hook("vdiff.prompt")
    enc.encode(["a", "b"])
    enc.encode(["c"])  # evicts "a"
    got = enc.encode(["b", "c", "a"])
    assert (hook.hits, hook.misses) == (2, 4)
    assert torch.allclose(got.embeds, ref.embeds[[1, 2, 0]], atol=1e-5) and torch.equal(got.mask, ref.mask[[1, 2, 0]])


def test_all_caches_together_and_hooks_come_off(pipe):
    ref, _ = run(pipe, [])
    names = ["text_kv", "mask", "prompt"]
    for name in names:
        pipe.enable_cache(name)
    pipe.enable_cache(StepCacheConfig(threshold=0.0))
    got, out = run(pipe, None)
    assert (got - ref).abs().max() <= 1e-5 and set(out.stats.cache) == {*names, "step"}
    pipe.disable_cache()
    assert pipe.caches == []
    assert not has_hook(pipe.transformer, "vdiff.text_kv") and not has_hook(pipe.transformer, "vdiff.step")
    assert not has_hook(pipe.text_encoder, "vdiff.prompt")
    assert pipe.transformer.blocks[0].forward.__func__ is VideoDiTBlock.forward  # the original forward is back ...
    assert VideoDiTBlock.forward.__qualname__ == "VideoDiTBlock.forward"  # ... and the class never touched
    again, _ = run(pipe, None)
    assert torch.equal(again, ref)


def test_unknown_cache_config_rejected():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        StepCacheConfig(threshold=-1)
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        StepCacheConfig(warmup_steps=0)
    assert TextKVCacheConfig.name == "text_kv"
