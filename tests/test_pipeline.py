"""VideoPipeline: sampling against references, reproducibility, save/load, validation, Wan-layout folders, threads."""

from __future__ import annotations

import json
import re
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vdiff.config import model_preset
from vdiff.diffusion.sampling import Cancelled, denoise, make_scheduler
from vdiff.limits import GenerationLimits
from vdiff.models.vae import PixelPatchVAE, WanVAE
from vdiff.pipeline import PipelineConfig, VideoPipeline

SMALL = dict(num_frames=4, height=16, width=16, num_inference_steps=3)  # (4, 2, 2) = 16 tokens


@pytest.fixture(scope="module")
def pipe() -> VideoPipeline:
    cfg = PipelineConfig(num_frames=4, height=16, width=16, num_inference_steps=3, text_max_length=16)
    return VideoPipeline.from_model_config(model_preset("tiny", num_layers=2), config=cfg, seed=0)


def final_latents(pipe, *args, **kwargs) -> torch.Tensor:
    seen = {}
    pipe(*args, callback=lambda i, n, x: seen.__setitem__("x", x.clone()), **kwargs)
    return seen["x"]


# --------------------------------------------------------------------------------------------------------------------
# The sampler: flow convention and CFG against references
# --------------------------------------------------------------------------------------------------------------------


class _OracleVelocity(torch.nn.Module):
    """The exact flow field when the data is one clip x0: x_s = (1-s) x0 + s eps  =>  v = eps - x0 = (x_s - x0) / s."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context, return_dict=False, attention_kwargs=None):
        s = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        return ((x - self.x0) / s.clamp_min(1e-4),)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_samplers_follow_the_flow_convention_to_the_data_point(sampler):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 2, 4, 4, generator=g)
    noise = torch.randn(1, 3, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, 8, generator=g)
    res = denoise(_OracleVelocity(x0), noise, ctx, None, make_scheduler(sampler, shift=3.0), 8, 1.0)
    # the ODE lands on the only data point (UniPC passes integer timesteps, so the oracle's s is off by < 1e-3)
    assert (res.latents - x0).abs().max() < (1e-3 if sampler == "euler" else 1e-2)
    assert (noise - x0).abs().max() > 1.0


def test_cfg_as_one_batch_matches_separate_branches(pipe):
    """v = v_u + g (v_c - v_u) computed from one 2B batch equals running cond and uncond separately."""
    kw = dict(SMALL, seed=3, guidance_scale=4.0, cache=[])
    got = final_latents(pipe, "a red circle moving right", negative_prompt="blurry", **kw)

    model, sched = pipe.transformer, make_scheduler("unipc", 3.0)
    cond = pipe.text_encoder.encode(["a red circle moving right"]).embeds
    uncond = pipe.text_encoder.encode(["blurry"]).embeds
    x = torch.randn(1, 48, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    sched.set_timesteps(3)
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.expand(1)
            v_c = model(x, tt, cond, return_dict=False)[0]
            v_u = model(x, tt, uncond, return_dict=False)[0]
            x = sched.step(v_u + 4.0 * (v_c - v_u), t, x, return_dict=False)[0]
    assert (got - x).abs().max() < 1e-5


def test_guidance_one_runs_only_the_conditional_branch(pipe):
    kw = dict(SMALL, seed=1, guidance_scale=1.0, cache=[])
    a = final_latents(pipe, "a blue square", negative_prompt="anything", **kw)
    b = final_latents(pipe, "a blue square", negative_prompt="something else", **kw)
    assert torch.equal(a, b)  # the negative prompt plays no part without guidance


# --------------------------------------------------------------------------------------------------------------------
# Outputs, seeds, batches, callbacks
# --------------------------------------------------------------------------------------------------------------------


def test_seeds_reproducible_and_distinct(pipe):
    a = pipe("a green triangle moving up", seed=7, **SMALL)
    b = pipe("a green triangle moving up", seed=7, **SMALL)
    c = pipe("a green triangle moving up", seed=8, **SMALL)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (4, 16, 16, 3)
    assert np.array_equal(a.videos, b.videos)
    assert np.abs(a.videos.astype(int) - c.videos.astype(int)).mean() > 5
    assert a.seed == 7 and pipe("x", **SMALL).seed >= 0  # seed None: a random seed, reported


def test_batched_prompts_match_single_calls(pipe):
    both = pipe(["a red circle", "a blue square"], seed=5, **SMALL)
    first = pipe("a red circle", seed=5, **SMALL)
    assert both.videos.shape == (2, 4, 16, 16, 3)
    assert np.array_equal(both.frames, both.videos[0])
    # the first clip's noise is the first slice of the batch's noise: same video up to batched-matmul rounding
    assert np.abs(both.videos[0].astype(int) - first.frames.astype(int)).max() <= 1
    assert np.abs(both.videos[0].astype(int) - both.videos[1].astype(int)).mean() > 5


def test_stats_report_timing_attention_and_tokens(pipe):
    out = pipe("a red circle", seed=0, **SMALL, cache=[])
    s = out.stats
    assert len(s.step_s) == 3 and s.total_s >= s.denoise_s >= sum(s.step_s) * 0.99
    assert s.tokens == 16 and s.grid == (4, 2, 2)
    assert s.attention.calls == 3 * 2 and s.attention.density == 1.0  # 3 steps x 2 layers, dense


def test_callback_sees_every_step_and_can_cancel(pipe):
    seen = []
    pipe("a red circle", seed=0, callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))), **SMALL)
    assert seen == [(i, 3, (1, 48, 4, 4, 4)) for i in range(3)]
    with pytest.raises(Cancelled, match="after step 2/3"):
        pipe("a red circle", seed=0, callback=lambda i, n, x: i < 1, **SMALL)


@pytest.mark.parametrize("ext", [".mp4", ".gif", ".webm"])
def test_save_writes_a_readable_video(pipe, tmp_path, ext):
    import imageio.v3 as iio

    out = pipe("a red circle", seed=0, num_frames=8, height=32, width=32, num_inference_steps=1)
    path = out.save(tmp_path / f"clip{ext}")
    back = iio.imread(path, index=None)[..., :3].astype(float)
    assert back.shape[0] == 8 and back.shape[1:3] == (32, 32)
    want = out.frames.astype(float)
    if ext == ".gif":  # palette quantisation only
        assert np.abs(back - want).mean() < 8
    # Every format keeps the content: each frame's mean colour, and each pixel's luma (the codecs halve the chroma
    # resolution, yuv420p, so per-pixel colour of this noise-like clip is not kept; its brightness is), in order.
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs(back.mean((1, 2)) - want.mean((1, 2))).max() < 6
    err = np.abs(back @ luma - want @ luma).mean()
    assert err < 8  # measured 3.8 (mp4), 4.9 (gif), 5.3 (webm); a wrong or shuffled clip is ~70
    assert np.abs(back @ luma - want[::-1] @ luma).mean() > 4 * err  # frame order kept


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=0), r"num_frames=0 is not allowed: must be a multiple of 1 in \[1, 256\]"),
    (dict(height=30), r"height=30 is not allowed: must be a multiple of 8 .* nearest valid: 24 or 32"),
    (dict(width=4), r"width=4 is not allowed: must be a multiple of 8 in \[8, 2048\]"),
    (dict(num_inference_steps=0), r"num_inference_steps must be an int in \[1, 1000\]"),
    (dict(guidance_scale=-1.0), r"guidance_scale must be a number in \[0, 50"),
    (dict(seed=-3), r"seed must be None or an int"),
    (dict(attention="nope"), r"attention: unknown attention backend 'nope'"),
    (dict(attention={"backend": "radial", "bogus": 1}), r"unknown config key 'attention.bogus'"),
    (dict(cache=["kv"]), r"cache: unknown cache 'kv'"),
    (dict(negative_prompt=["a", "b"]), r"negative_prompt: got 2 negative prompts for 1 prompts"),
    (dict(callback=3), r"callback must be callable"),
])
def test_bad_arguments_raise_naming_the_argument(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", **{**SMALL, **kwargs})


def test_bad_prompt_rejected(pipe):
    for bad in ([], [1], None):
        with pytest.raises(ValueError, match="prompt must be a string or a non-empty list"):
            pipe(bad, **SMALL)


def test_limits_describe_the_defaults_and_ranges(pipe):
    lim = pipe.limits
    assert lim.height.multiple == 8 and lim.height.max == 8 * 256
    assert lim.default_frames == 4 and lim.steps.max == 1000


def _wan_vae_rules_only() -> WanVAE:
    """A WanVAE around a weightless stand-in: enough for its strides and frame rule (no encode / decode)."""
    stand_in = torch.nn.Module()
    stand_in.config = SimpleNamespace(scale_factor_temporal=4, scale_factor_spatial=8, z_dim=16,
                                      latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    return WanVAE(stand_in)


@pytest.mark.parametrize("vae_name, patch, cap", [
    ("pixel-1", (1, 2, 2), None), ("pixel-2", (1, 2, 2), None), ("pixel-2", (2, 2, 2), None),
    ("pixel-2", (2, 2, 2), 23), ("wan", (1, 2, 2), None), ("wan", (2, 2, 2), None), ("wan", (1, 2, 2), 30),
])
def test_frame_limits_follow_the_vae_patch_and_rope_rules(vae_name, patch, cap):
    """GenerationLimits.frames (a min, a max and a multiple) holds exactly the counts the components accept: the VAE
    encodes n (its own check), the latent frames fill whole temporal patches, the token frames fit the RoPE table."""
    vaes = {"pixel-1": PixelPatchVAE((1, 4, 4)), "pixel-2": PixelPatchVAE((2, 4, 4)), "wan": _wan_vae_rules_only()}
    vae = vaes[vae_name]
    rope = 8
    lim = GenerationLimits.build(vae, patch, rope, PipelineConfig(max_num_frames=cap))
    _, sh, sw = vae.stride

    def accepted(n: int) -> bool:
        if vae.check_size(n, sh, sw) is not None:
            return False
        latent = vae.latent_shape(n, sh, sw)[0]
        return latent % patch[0] == 0 and latent // patch[0] <= rope and (cap is None or n <= cap)

    expected = [n for n in range(1, 200) if accepted(n)]
    assert [n for n in range(1, 200) if n in lim.frames] == expected
    assert (lim.frames.min, lim.frames.max) == (expected[0], expected[-1])
    for n in expected:  # token frames x one token row x one token column
        assert lim.token_count(n, sh * patch[1], sw * patch[2]) == vae.latent_shape(n, sh, sw)[0] // patch[0]
    assert lim.height.multiple == sh * patch[1] and lim.height.max == sh * patch[1] * rope


# --------------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_same_video(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    pipe.save_pretrained(tmp_path / "p")  # overwriting an existing folder works (atomic swap)
    back = VideoPipeline.from_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "vdiff.json").read_text())["num_frames"] == 4
    assert back.config == pipe.config and back.caches == pipe.caches
    a = pipe("a red circle moving left", seed=11, **SMALL)
    b = back("a red circle moving left", seed=11, **SMALL)
    assert np.array_equal(a.videos, b.videos)
    with pytest.raises(FileNotFoundError, match="no vdiff.json"):
        VideoPipeline.from_pretrained(tmp_path)


def test_a_folder_without_its_scheduler_config_does_not_load(pipe, tmp_path):
    """No silent default sampler: a folder missing scheduler/scheduler_config.json is an error naming the file."""
    pipe.save_pretrained(tmp_path / "p")
    missing = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        VideoPipeline.from_pretrained(tmp_path / "p")


def test_euler_scheduler_round_trips(tmp_path):
    p = VideoPipeline.from_model_config(model_preset("tiny", num_layers=2), scheduler=make_scheduler("euler", 5.0),
                                        config=PipelineConfig(text_max_length=8))
    p.save_pretrained(tmp_path / "e")
    back = VideoPipeline.from_pretrained(tmp_path / "e")
    assert type(back.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and back.scheduler.config.shift == 5.0
    a = p("x", seed=0, **SMALL).videos
    assert np.array_equal(a, back("x", seed=0, **SMALL).videos)
    assert not np.array_equal(a, back("x", seed=0, sampler="unipc", **SMALL).videos)


# --------------------------------------------------------------------------------------------------------------------
# Wan2.1 diffusers layout with tiny random components
# --------------------------------------------------------------------------------------------------------------------


def make_wan_folder(root):
    """A Wan2.1-layout diffusers folder: WanTransformer3DModel, UMT5 encoder + tokenizer, AutoencoderKLWan, UniPC."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from vdiff.models.text import minilm_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)  # any local tokenizer will do
    tok.save_pretrained(root / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder")
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    vae.save_pretrained(root / "vae")
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                          out_channels=16, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                          rope_max_seq_len=32).save_pretrained(root / "transformer")
    make_scheduler("unipc", 3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "BertTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    return vae


@pytest.mark.slow
def test_wan_layout_folder_loads_and_samples(tmp_path):
    from transformers import UMT5EncoderModel

    vae_ref = make_wan_folder(tmp_path)
    pipe = VideoPipeline.from_pretrained(tmp_path, text_max_length=16)
    assert pipe.config.num_frames == 81 and pipe.config.height == 480  # Wan's defaults
    assert pipe.vae.stride == (4, 8, 8) and pipe.limits.height.multiple == 16

    # the UMT5 path: per-token states of the real encoder, zero beyond each prompt, fixed length
    emb = pipe.text_encoder.encode(["a red circle", "a much longer prompt about a blue square"])
    ref_model = UMT5EncoderModel.from_pretrained(tmp_path / "text_encoder")
    tok = pipe.text_encoder.tokenizer(["a red circle"], return_tensors="pt")
    ref = ref_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state[0]
    n = tok.input_ids.shape[1]
    assert emb.embeds.shape == (2, 16, 32) and emb.mask[0].sum() == n
    assert (emb.embeds[0, :n] - ref).abs().max() < 1e-5 and emb.embeds[0, n:].abs().max() == 0

    # Wan VAE wrapper: decode = diffusers decode of z * std + mean
    z = torch.randn(1, 16, 2, 4, 4)
    mean = torch.tensor(vae_ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_ref.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        ref_video = vae_ref.decode(z * std + mean).sample.clamp(-1, 1)
    assert torch.allclose(pipe.vae.decode(z), ref_video, atol=1e-5)
    assert pipe.vae.latent_shape(81, 480, 832) == (21, 60, 104)

    with pytest.raises(ValueError, match=r"num_frames=6 is not allowed: must be 4k\+1 .* nearest valid: 5 or 9"):
        pipe("x", num_frames=6, height=32, width=32)
    out = pipe("a red circle moving right", num_frames=5, height=32, width=32, num_inference_steps=2, seed=0)
    assert out.frames.shape == (5, 32, 32, 3) and out.stats.grid == (2, 2, 2)
    again = pipe("a red circle moving right", num_frames=5, height=32, width=32, num_inference_steps=2, seed=0)
    assert np.array_equal(out.videos, again.videos)


# --------------------------------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------------------------------


def test_concurrent_calls_match_sequential_calls(pipe):
    """Threads share the model and its cache hooks but never scheduler or cache state."""
    kw = dict(SMALL, cache=["text_kv", "step", "prompt"])
    expected = {s: pipe(f"prompt {s}", seed=s, **kw).videos for s in range(3)}
    got, errors = {}, []

    def run(s):
        try:
            got[s] = pipe(f"prompt {s}", seed=s, **kw).videos
        except Exception as err:  # pragma: no cover - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in range(3):
        assert np.abs(got[s].astype(int) - expected[s].astype(int)).max() <= 1
