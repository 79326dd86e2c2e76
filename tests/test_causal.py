"""Long video: block-causal attention, the causal KV cache against the full recompute, RoPE policies, commit modes,
eviction, prompt switches and bad input (tiny random-weight models, fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.attention import AttentionContext
from vdiff.attention.dense import reference_attention
from vdiff.cache import CausalKVCacheConfig
from vdiff.config import AttentionConfig, CausalConfig, ConfigError, model_preset
from vdiff.models.causal import causal_attention, layout_for
from vdiff.models.dit import VideoDiT
from vdiff.models.layers import RotaryPosEmbed3D, apply_rope
from vdiff.pipeline import PipelineConfig, VideoPipeline

PROMPT = "a red circle moving right"


def _pipe(rope="window", sink=1, window=1, guidance=3.0, context_noise=0.1, cache=("text_kv", "causal_kv")):
    cfg = model_preset("tiny", num_layers=2, causal=CausalConfig(chunk_frames=2, sink_chunks=sink,
                                                                   window_chunks=window, rope=rope))
    config = PipelineConfig(num_frames=8, height=16, width=16, num_inference_steps=3, guidance_scale=guidance,
                            cache=list(cache), context_noise=context_noise)
    return VideoPipeline.from_model_config(cfg, config=config)


def _latents(pipe, **kw):
    return [c.latents for c in pipe.stream(PROMPT, seed=3, **kw)]


@pytest.mark.parametrize("rope, sink, window", [("absolute", 1, 1), ("window", 1, 1), ("window", 0, None),
                                                ("absolute", 0, 2), ("window", 2, 0)])
def test_cached_stream_equals_full_recompute(rope, sink, window):
    """causal_kv (each chunk attends stored K/V) == the full block-causal forward over the whole history at every
    step, with and without sink / window / eviction, CFG on (two K/V branches), context noise on."""
    pipe = _pipe(rope, sink, window)
    cached = _latents(pipe, num_chunks=5)
    reference = _latents(pipe, num_chunks=5, cache=["text_kv"])
    for c, (x, y) in enumerate(zip(cached, reference)):
        assert x.abs().max() > 0.1  # real latents, not zeros
        assert (x - y).abs().max() <= 1e-5, (c, float((x - y).abs().max()))


def test_window_and_sink_change_what_later_chunks_see():
    """The attention rule matters: same weights and seed, a global window and a 1-chunk window agree while every
    chunk is inside both windows and differ once the window drops chunks."""
    wide = _latents(_pipe(window=None), num_chunks=4)
    narrow = _latents(_pipe(window=1), num_chunks=4)
    for c in range(3):  # chunk 2 sees 0 (sink) and 1 (window): everything
        torch.testing.assert_close(wide[c], narrow[c], atol=1e-5, rtol=0)
    assert (wide[3] - narrow[3]).abs().max() > 1e-3  # chunk 3 no longer sees chunk 1


def test_causal_attention_equals_explicit_block_causal_mask():
    """Absolute RoPE, sink 1, window 1: the per-chunk attention == float64 softmax attention over all tokens with the
    explicit block-causal mask (chunk c sees chunk 0, chunk c - 1 and itself)."""
    frames, hw, chunks = 2, (2, 3), 5
    rope = RotaryPosEmbed3D(16, 64)
    cfg = CausalConfig(chunk_frames=frames, sink_chunks=1, window_chunks=1, rope="absolute")
    layout = layout_for(cfg, (frames * chunks, *hw), 1, rope, None)
    n = layout.chunk_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, chunks * n, 2, 16, generator=g) for _ in range(3))
    ctx = AttentionContext(grid=(frames * chunks, *hw), config=AttentionConfig(), causal=layout)
    got = causal_attention(q, k, v, ctx)
    cos, sin = rope((frames * chunks, *hw))
    chunk_of = torch.arange(chunks * n) // n
    c, j = chunk_of[:, None], chunk_of[None, :]
    mask = (j == c) | ((j < c) & ((j == 0) | (c - j <= 1)))
    assert not mask.all() and mask.float().mean() < 0.7  # a real block-causal pattern
    want = reference_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_one_chunk_is_the_bidirectional_model():
    """A causal model whose single chunk spans the clip (absolute RoPE) is the bidirectional model, same weights."""
    plain_cfg = model_preset("tiny", num_layers=2)
    causal_cfg = model_preset("tiny", num_layers=2, causal=CausalConfig(chunk_frames=4, sink_chunks=0,
                                                                        window_chunks=None, rope="absolute"))
    plain = VideoDiT.from_model_config(plain_cfg).eval()
    causal = VideoDiT.from_model_config(causal_cfg).eval()
    causal.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 48, 4, 4, 4, generator=g), torch.randn(2, 5, 384, generator=g)
    t = torch.tensor([200.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(causal(x, t, text).sample, plain(x, t, text).sample, atol=1e-5, rtol=1e-5)


def test_window_rope_is_invariant_to_the_absolute_chunk_index():
    """rope='window': chunk 500 attending (sink 0, chunk 499) computes what chunk 5 attending (0, 4) computes."""
    cfg = model_preset("tiny", num_layers=2, causal=CausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=1))
    model = VideoDiT.from_model_config(cfg).eval()
    g = torch.Generator().manual_seed(2)
    x, text, t = torch.randn(1, 48, 6, 4, 4, generator=g), torch.randn(1, 5, 384, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        near = model(x, t, text, attention_kwargs={"chunks": [(0, True), (4, True), (5, False)]}).sample
        far = model(x, t, text, attention_kwargs={"chunks": [(0, True), (499, True), (500, False)]}).sample
    torch.testing.assert_close(far, near, atol=1e-6, rtol=1e-6)
    absolute = model_preset("tiny", num_layers=2, causal=CausalConfig(chunk_frames=2, sink_chunks=1,
                                                                      window_chunks=1, rope="absolute"))
    with torch.no_grad(), pytest.raises(ValueError, match=r"chunk 500 reaches token frame 1002, past "
                                                           r"rope_max_seq_len=256.*rope='window'"):
        VideoDiT.from_model_config(absolute).eval()(
            x, t, text, attention_kwargs={"chunks": [(0, True), (499, True), (500, False)]})


def test_commit_modes_eviction_and_sink_bytes():
    pipe = _pipe(window=1, sink=1)
    clean = _latents(pipe, num_chunks=4)
    last = _latents(pipe, num_chunks=4, cache=["text_kv", CausalKVCacheConfig(commit="last_step")])
    torch.testing.assert_close(last[0], clean[0], atol=1e-6, rtol=0)  # chunk 0 has no history either way
    assert (last[1] - clean[1]).abs().max() > 1e-4  # the stored K/V differ: the last step's, not the clean chunk's
    # eviction: after chunk c the buffers hold the sink and the last window chunk; the sink's bytes never change
    from vdiff.cache import CausalKVState

    seen, sinks = [], []
    real_init = CausalKVState.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        seen.append(self)

    CausalKVState.__init__ = spy
    try:
        gen = pipe.stream(PROMPT, seed=3, num_chunks=5)
        for chunk in gen:
            state = seen[0]
            assert state.chunks() == sorted({0, chunk.index} if chunk.index else {0})
            sinks.append(state.layers[0].k[:, :state.layers[0].n].clone())
    finally:
        CausalKVState.__init__ = real_init
    assert all(torch.equal(s, sinks[0]) for s in sinks)
    assert chunk.stats["kv_bytes"] > 0 and chunk.stats["tokens_attended"] == 3 * seen[0].layers[0].n


def test_flat_memory_with_a_finite_window():
    pipe = _pipe(window=1, sink=1, guidance=1.0)
    sizes = [c.stats["kv_bytes"] for c in pipe.stream(PROMPT, seed=0, num_chunks=6)]
    assert sizes[1] == sizes[-1]  # preallocated sink + window slots: no growth


def test_prompt_switch_takes_effect_at_its_chunk():
    pipe = _pipe(window=None, sink=1)
    base = _latents(pipe, num_chunks=4)
    switched = list(pipe.stream(PROMPT, seed=3, num_chunks=4, prompts={2: "a blue square moving up"}))
    for c in range(2):
        torch.testing.assert_close(switched[c].latents, base[c], atol=0, rtol=0)
    assert [c.prompt for c in switched] == [PROMPT, PROMPT, "a blue square moving up", "a blue square moving up"]
    assert (switched[2].latents - base[2]).abs().max() > 1e-3


NEW = "a blue square moving up"


THIRD = "a green triangle moving left"


@pytest.mark.parametrize("guidance, commit, window, external", [
    (1.0, "clean", 1, "off"), (3.0, "clean", None, "off"), (1.0, "last_step", 2, "off"), (1.0, "clean", 1, "split")])
def test_switch_guidance_cached_equals_recompute_and_drops_the_old_branch(guidance, commit, window, external):
    """Switch guidance keeps the old prompt's cache beside the re-cached one: cached == the full recompute (whose old
    branch is the whole history under the old prompt), with and without CFG, eviction and the block-external split;
    it runs for switch_guidance_chunks chunks (stats, and the old branch's KV bytes on top), chunks before the switch
    are untouched, and the guided chunks differ from an unguided switch."""
    pipe = _pipe(window=window, guidance=guidance)
    kw = dict(num_chunks=6, prompts={2: NEW}, switch_guidance=2.5, switch_guidance_chunks=2,
              cache=["text_kv", CausalKVCacheConfig(commit=commit, external=external)])
    guided = list(pipe.stream(PROMPT, seed=3, **kw))
    plain = list(pipe.stream(PROMPT, seed=3, **{**kw, "switch_guidance": 1.0}))
    assert [c.stats["switch_guidance"] for c in guided] == [None, None, 2.5, 2.5, None, None]
    assert [c.stats["switch_guidance"] for c in plain] == [None] * 6
    assert guided[2].stats["kv_bytes"] > guided[4].stats["kv_bytes"] == plain[4].stats["kv_bytes"] > 0
    for c in range(2):
        torch.testing.assert_close(guided[c].latents, plain[c].latents, atol=0, rtol=0)
    assert min((guided[c].latents - plain[c].latents).abs().max() for c in (2, 3)) > 1e-3
    if commit == "clean":
        reference = _latents(pipe, **{**kw, "cache": ["text_kv"]})
        for c, (x, y) in enumerate(zip(guided, reference)):
            assert (x.latents - y).abs().max() <= 1e-5, (c, float((x.latents - y).abs().max()))


def test_switch_guidance_second_switch_chunk_zero_and_same_prompt():
    """A second switch while guidance runs guides away from the prompt it replaces (cached == recompute, and the
    guidance restarts there); a switch at chunk 0 is no switch at all (the prompt argument made no frame) and a
    switch to the prompt in force starts no guidance. (Global window: a re-cache after an eviction re-commits only
    the held chunks, which the full recompute does not model.)"""
    pipe = _pipe(window=None, guidance=1.0)
    kw = dict(num_chunks=6, prompts={2: NEW, 3: THIRD}, switch_guidance=2.0, switch_guidance_chunks=2)
    twice = list(pipe.stream(PROMPT, seed=3, **kw))
    assert [c.stats["switch_guidance"] for c in twice] == [None, None, 2.0, 2.0, 2.0, None]
    reference = _latents(pipe, **kw, cache=["text_kv"])
    for c, (x, y) in enumerate(zip(twice, reference)):
        assert (x.latents - y).abs().max() <= 1e-5, (c, float((x.latents - y).abs().max()))
    at_zero = list(pipe.stream(PROMPT, seed=3, num_chunks=3, prompts={0: NEW}, switch_guidance=2.0))
    direct = list(pipe.stream(NEW, seed=3, num_chunks=3))
    assert [c.stats["switch_guidance"] for c in at_zero] == [None] * 3
    for x, y in zip(at_zero, direct):
        torch.testing.assert_close(x.latents, y.latents, atol=0, rtol=0)
    same = list(pipe.stream(PROMPT, seed=3, num_chunks=4, prompts={2: PROMPT}, switch_guidance=2.0))
    assert [c.stats["switch_guidance"] for c in same] == [None] * 4


def test_switch_guidance_is_guidance_with_the_old_prompt_as_negative():
    """Known answer: guidance g with negative prompt = the old prompt gives v_old + g (v_new - v_old) after a switch
    (the negative branch re-caches under the same old prompt, so its cache is the old one) and plain v before it
    (both branches equal). Switch guidance g over all remaining chunks must compute the same thing, through its own
    code path (a copied cache and a second forward instead of the CFG batch)."""
    pipe = _pipe(window=1, guidance=1.0)
    ours = _latents(pipe, num_chunks=5, prompts={2: NEW}, switch_guidance=3.0, switch_guidance_chunks=3)
    negative = _latents(pipe, num_chunks=5, prompts={2: NEW}, guidance_scale=3.0, negative_prompt=PROMPT)
    for c, (x, y) in enumerate(zip(ours, negative)):
        assert x.abs().max() > 0.1
        assert (x - y).abs().max() <= 1e-5, (c, float((x - y).abs().max()))


def test_switch_guidance_defaults_come_from_the_pipeline_config():
    pipe = _pipe(guidance=1.0)
    pipe.config.switch_guidance, pipe.config.switch_guidance_chunks = 2.0, 1
    chunks = list(pipe.stream(PROMPT, seed=3, num_chunks=4, prompts={1: NEW}))
    assert [c.stats["switch_guidance"] for c in chunks] == [None, 2.0, None, None]
    with pytest.raises(ConfigError, match=r"switch_guidance must be a number in \[1, 20\] \(1 = off\), got 0.5"):
        PipelineConfig(switch_guidance=0.5)
    with pytest.raises(ValueError, match=r"switch_guidance_chunks must be an int in \[1, 1000\], got 0"):
        next(pipe.stream(PROMPT, switch_guidance_chunks=0))
    with pytest.raises(ValueError, match=r"switch_guidance must be a number in \[1, 20\] \(1 = off\), got 25"):
        next(pipe.stream(PROMPT, switch_guidance=25))


def test_call_on_a_causal_model_collects_the_stream():
    pipe = _pipe()
    out = pipe(PROMPT, num_frames=8, seed=5)
    chunks = list(pipe.stream(PROMPT, seed=5, num_chunks=4))
    assert out.videos.shape == (1, 8, 16, 16, 3)
    assert (out.frames == torch.cat([torch.from_numpy(c.frames) for c in chunks]).numpy()).all()


def test_sampler_and_shift_per_call_are_the_schedulers_they_name():
    """stream / __call__ with sampler= and shift= run every chunk on that scheduler: equal to a pipeline whose folder
    scheduler is that one, and different from the default."""
    from vdiff.diffusion.sampling import fresh_scheduler, sampler_name

    pipe = _pipe()
    default = _latents(pipe, num_chunks=3)
    asked = _latents(pipe, num_chunks=3, sampler="euler", shift=2.0)
    assert sampler_name(pipe.scheduler) != "euler"
    pipe.scheduler = fresh_scheduler(pipe.scheduler, "euler", 2.0)  # the same scheduler as the folder's
    for a, b in zip(asked, _latents(pipe, num_chunks=3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max((a - b).abs().max().item() for a, b in zip(asked, default)) > 1e-3
    clip = pipe(PROMPT, num_frames=6, seed=3, shift=2.0, sampler="euler")  # the call collects that stream
    assert (clip.frames == torch.cat([torch.from_numpy(c.frames) for c in pipe.stream(PROMPT, seed=3, num_chunks=3)])
            .numpy()).all()


def test_bad_input_names_the_argument():
    pipe = _pipe()
    with pytest.raises(ValueError, match="num_chunks must be None .* or an int >= 1, got 0"):
        next(pipe.stream(PROMPT, num_chunks=0))
    with pytest.raises(ValueError, match=r"prompts: keys must be chunk indices \(ints >= 0\), got -1"):
        next(pipe.stream(PROMPT, prompts={-1: "x"}))
    with pytest.raises(ValueError, match="prompts: keys must be chunk indices"):
        next(pipe.stream(PROMPT, prompts={"3": "x"}))
    with pytest.raises(ValueError, match="num_frames=7 is not allowed for this causal model: must be a multiple of 2"):
        pipe(PROMPT, num_frames=7)
    plain = VideoPipeline.from_model_config(model_preset("tiny", num_layers=1))
    with pytest.raises(ValueError, match="stream needs a causal model"):
        next(plain.stream(PROMPT))
    model = pipe.transformer
    with torch.no_grad(), pytest.raises(ValueError, match="3 token frames do not divide into chunks of 2"):
        model(torch.randn(1, 48, 3, 4, 4), torch.tensor([1.0]), torch.randn(1, 5, 384))
    with pytest.raises(ValueError, match="vmoba' does not run a causal model"), torch.no_grad():
        model(torch.randn(1, 48, 4, 4, 4), torch.tensor([1.0]), torch.randn(1, 5, 384),
              attention_kwargs={"attention": "vmoba"})
    with pytest.raises(ConfigError, match="model.causal.window_chunks must be null"):
        CausalConfig(window_chunks=-1)
    with pytest.raises(ConfigError, match="model.causal has no Wan/diffusers equivalent"):
        model_preset("tiny", causal=CausalConfig()).to_diffusers()


def test_tokens_per_chunk_stay_flat():
    """Cost per chunk does not grow with the video: a finite window attends the same number of keys per chunk."""
    pipe = _pipe(window=2, sink=1, guidance=1.0)
    attended = [c.stats["tokens_attended"] for c in pipe.stream(PROMPT, seed=0, num_chunks=7)]
    n = math.prod(pipe.transformer.token_grid((2, 4, 4)))
    assert attended == [n, 2 * n, 3 * n, 4 * n, 4 * n, 4 * n, 4 * n]


def test_block_external_split_is_exact_and_reuse_is_close():
    """external="split" (stored keys and own keys attended apart, merged by log-sum-exp) == plain causal_kv; "reuse"
    (the stored-keys part kept from each chunk's first step) differs, but little (it is an approximation)."""
    pipe = _pipe(window=2, sink=1)
    plain = _latents(pipe, num_chunks=4)
    split = _latents(pipe, num_chunks=4, cache=["text_kv", CausalKVCacheConfig(external="split")])
    reuse = _latents(pipe, num_chunks=4, cache=["text_kv", CausalKVCacheConfig(external="reuse")])
    for c in range(4):
        torch.testing.assert_close(split[c], plain[c], atol=1e-5, rtol=0)
    assert (reuse[2] - plain[2]).abs().max() > 1e-6  # really reused: later steps saw the first step's part
    scale = max(float(x.abs().max()) for x in plain)
    assert max(float((x - y).abs().max()) for x, y in zip(reuse, plain)) < 0.5 * scale
    with pytest.raises(ValueError, match="external must be one of"):
        CausalKVCacheConfig(external="sometimes")
