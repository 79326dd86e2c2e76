"""VideoDiT inside diffusers: WanPipeline / WanImageToVideoPipeline give the same video as with WanTransformer3DModel,
diffusers' block caches run on it (and the others refuse), single-file loading of the original Wan2.1 layout, and
text encoders loaded and prompts cleaned as diffusers does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, FirstBlockCacheConfig, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from vdiff.diffusion.sampling import make_scheduler
from vdiff.models.dit import VideoDiT
from vdiff.models.text import minilm_path

T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
           text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
# Wan I2V: 16 noise + 4 mask + 16 image-latent channels in, CLIP image tokens through added K/V projections
I2V = dict(T2V, in_channels=36, image_dim=4, added_kv_proj_dim=16)
CALL = dict(num_frames=5, height=32, width=32, num_inference_steps=3, output_type="latent")
PROMPT = "a red  circle &amp; a blue square\n moving right"


def tiny_text():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)  # any local tokenizer will do
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8)).eval()
    return tok, te


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def transformer_pair(cfg):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    ours = VideoDiT(**cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def parts():
    tok, te = tiny_text()
    return tok, te, tiny_vae()


def wan_pipe(parts, transformer):
    tok, te, vae = parts
    return WanPipeline(tokenizer=tok, text_encoder=te, transformer=transformer, vae=vae,
                       scheduler=make_scheduler("unipc", 3.0))


def sample(pipe, **kw):
    return pipe(PROMPT, negative_prompt="blurry", max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), **{**CALL, **kw}).frames


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------------------------
# diffusers' pipelines drive a VideoDiT
# --------------------------------------------------------------------------------------------------------------------


def test_wan_pipeline_gives_the_same_video_with_videodit(parts):
    ref, ours = transformer_pair(T2V)
    want, got = sample(wan_pipe(parts, ref)), sample(wan_pipe(parts, ours))
    assert got.shape == want.shape == (1, 16, 2, 4, 4) and want.abs().mean() > 0.1
    assert _rel(got, want) <= 1e-5
    video_ref = sample(wan_pipe(parts, ref), output_type="np")
    video = sample(wan_pipe(parts, ours), output_type="np")
    assert video.shape == (1, 5, 32, 32, 3) and np.abs(video - video_ref).max() <= 1e-5


def test_image_to_video_pipeline_gives_the_same_video_with_videodit(parts):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    tok, te, vae = parts
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=32, intermediate_size=16,
                                                          patch_size=1)).eval()
    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    ref, ours = transformer_pair(I2V)

    def run(transformer):
        pipe = WanImageToVideoPipeline(tokenizer=tok, text_encoder=te, transformer=transformer, vae=vae,
                                       scheduler=make_scheduler("unipc", 3.0), image_encoder=clip,
                                       image_processor=CLIPImageProcessor(crop_size=32, size=32))
        # max_sequence_length 512: Wan's I2V cross-attention splits [image tokens | 512 text tokens]
        return pipe(image=image, prompt=PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(0),
                    **CALL).frames

    want, got = run(ref), run(ours)
    assert got.shape == want.shape == (1, 16, 2, 4, 4) and want.abs().mean() > 0.1
    assert _rel(got, want) <= 1e-5


def test_first_block_cache_through_the_hook_registry_matches_diffusers(parts):
    """diffusers' FirstBlockCache on VideoDiT's blocks decides and skips as on Wan's: the same (changed) video."""
    ref, ours = transformer_pair(T2V)
    plain = sample(wan_pipe(parts, ours))
    for model in (ref, ours):
        model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # skip blocks 1.. at every step after the first
    assert ours.is_cache_enabled
    want, got = sample(wan_pipe(parts, ref)), sample(wan_pipe(parts, ours))
    assert _rel(got, want) <= 1e-5
    assert _rel(got, plain) > 1e-3  # the cache really skipped work
    ours.disable_cache()
    assert torch.equal(sample(wan_pipe(parts, ours)), plain)


def test_mag_cache_matches_diffusers(parts):
    from diffusers import MagCacheConfig

    ref, ours = transformer_pair(T2V)
    plain = sample(wan_pipe(parts, ours))
    for model in (ref, ours):
        model.enable_cache(MagCacheConfig(threshold=10.0, max_skip_steps=2, retention_ratio=0.0, num_inference_steps=3,
                                          mag_ratios=[1.0, 1.0, 1.0]))
    want, got = sample(wan_pipe(parts, ref)), sample(wan_pipe(parts, ours))
    assert _rel(got, want) <= 1e-5 and _rel(got, plain) > 1e-3


def test_what_videodit_does_not_run_is_refused_not_ignored():
    from diffusers import PyramidAttentionBroadcastConfig, TextKVCacheConfig

    _, ours = transformer_pair(T2V)
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastConfig.*'step' cache"):
        ours.enable_cache(PyramidAttentionBroadcastConfig())
    with pytest.raises(ValueError, match="'text_kv' cache"):
        ours.enable_cache(TextKVCacheConfig())
    with pytest.raises(ValueError, match="set_attention"):
        ours.set_attention_backend("sage")
    with pytest.raises(NotImplementedError, match="set_attention"):
        ours.set_attn_processor(object())
    with pytest.raises(NotImplementedError, match="apply_sequence_parallel"):
        ours.enable_parallelism()
    with pytest.raises(RuntimeError, match="xformers"):  # a real kernel choice: checked on this (CPU) device
        ours.set_attention_backend("xformers")
    ours.set_attention("radial")
    ours.set_attention_backend("native")  # diffusers' native SDPA = vdiff's sdpa kernel; the pattern stays
    assert (ours.attention_config.backend, ours.attention_config.kernel) == ("radial", "sdpa")


def test_compile_repeated_blocks_compiles_each_block_and_keeps_outputs():
    _, ours = transformer_pair(T2V)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 6, 32)
    with torch.no_grad():
        want = ours(x, t, ctx).sample
        ours.compile_repeated_blocks(backend="eager")  # dynamo capture without inductor: quick on CPU
        got = ours(x, t, ctx).sample
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in ours.blocks)
    assert torch.allclose(got, want, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Single-file checkpoints in the original Wan2.1 layout
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [T2V, I2V], ids=["t2v", "i2v"])
def test_from_single_file_reads_the_original_wan_layout(tmp_path, cfg):
    from safetensors.torch import save_file

    from vdiff.models.single_file import diffusers_to_original, original_to_diffusers

    ref, _ = transformer_pair(cfg)
    state = ref.state_dict()
    original = diffusers_to_original(state)
    assert "blocks.0.self_attn.q.weight" in original and "blocks.1.norm3.weight" in original
    assert "head.head.weight" in original and "time_projection.1.weight" in original
    assert original_to_diffusers(original).keys() == state.keys()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}, tmp_path / "wan.safetensors")

    model = VideoDiT.from_single_file(tmp_path / "wan.safetensors", num_attention_heads=2)
    for key in ("in_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "image_dim", "added_kv_proj_dim"):
        assert model.config[key] == ref.config[key], key
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg["in_channels"], 2, 4, 4, generator=g)
    extra = {"encoder_hidden_states_image": torch.randn(1, 3, 4, generator=g)} if cfg.get("image_dim") else {}
    ctx = torch.randn(1, 512 if extra else 6, 32, generator=g)
    with torch.no_grad():
        want = ref(x, torch.tensor([300.0]), ctx, **extra).sample
        assert _rel(model(x, torch.tensor([300.0]), ctx, **extra).sample, want) <= 1e-6

    # the file is what diffusers itself reads as an original Wan checkpoint (an independent check of the names)
    ref.save_pretrained(tmp_path / "config")
    theirs = WanTransformer3DModel.from_single_file(str(tmp_path / "wan.safetensors"), config=str(tmp_path / "config"),
                                                    local_files_only=True).eval()
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_single_file_refuses_unknown_keys(tmp_path):
    from safetensors.torch import save_file

    from vdiff.models.single_file import diffusers_to_original

    ref, _ = transformer_pair(T2V)
    original = diffusers_to_original(ref.state_dict())
    original["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "odd.safetensors")
    with pytest.raises(KeyError, match="blocks.0.self_attn.extra.weight"):
        VideoDiT.from_single_file(tmp_path / "odd.safetensors")


# --------------------------------------------------------------------------------------------------------------------
# Text encoders and prompts as diffusers has them
# --------------------------------------------------------------------------------------------------------------------


def test_clean_prompt_is_diffusers_prompt_clean():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    from vdiff.models.text import clean_prompt

    prompts = [PROMPT, "  Tom &amp;amp; Jerry\t\trun  ", "caf\u00c3\u00a9 &lt;b&gt; x", "a plain prompt", "\n"]
    for p in prompts:
        assert clean_prompt(p) == prompt_clean(p), p
    assert clean_prompt(PROMPT) == "a red circle & a blue square moving right"


def test_t5_family_folders_load_their_own_class_and_match_wan_pipeline(parts, tmp_path):
    from transformers import T5Config, T5EncoderModel

    from vdiff.models.text import HFTextEncoder

    tok, te, vae = parts
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8)).eval()
    for name, model in (("t5", t5), ("umt5", te)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        enc = HFTextEncoder.from_pretrained(tmp_path / name, max_length=16)
        assert type(enc.model) is type(model) and enc.clean_prompts
        # the same embeddings as diffusers' WanPipeline for a prompt with entities and extra whitespace
        pipe = WanPipeline(tokenizer=tok, text_encoder=model, transformer=None, vae=vae,
                           scheduler=make_scheduler("unipc", 3.0))
        want, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=16)
        got = enc.encode([PROMPT]).embeds
        assert got.shape == want.shape == (1, 16, 32) and (got - want).abs().max() <= 1e-6, name

    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "t5" / "config.json").write_text(json.dumps(config | {"architectures": ["UMT5EncoderModel"]}))
    with pytest.raises(ValueError, match="model_type='t5' but architectures.*UMT5EncoderModel"):
        HFTextEncoder.from_pretrained(tmp_path / "t5")


def test_minilm_prompts_are_not_rewritten():
    """The packaged MiniLM models were trained on raw captions: no cleaning there (same embeddings as before)."""
    from vdiff.models.text import minilm_text_encoder

    enc = minilm_text_encoder(16)
    assert not enc.clean_prompts
    assert not torch.equal(enc.encode(["red &amp; blue"]).embeds, enc.encode(["red & blue"]).embeds)
