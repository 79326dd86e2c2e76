"""VideoDiT == diffusers' WanTransformer3DModel: same keys, same outputs, checkpoints load both ways."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from vdiff.attention import AttentionBackend, AttentionStats, register_backend, unregister_backend
from vdiff.attention.dense import sdpa_attention
from vdiff.config import AttentionConfig, ModelConfig, model_preset
from vdiff.models.dit import VideoDiT, model_config_of

CONFIGS = {
    # 2 layers, 2 heads; latent (3 frames, 6 x 10): odd frames and a non-square grid
    "odd-nonsquare": dict(latent=(3, 6, 10), cfg=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                          out_channels=4, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64)),
    # patch over time too, no cross-attn norm, different head dim
    "tpatch": dict(latent=(4, 8, 4), cfg=dict(patch_size=(2, 2, 1), num_attention_heads=2, attention_head_dim=24,
                   in_channels=3, out_channels=5, text_dim=16, freq_dim=16, ffn_dim=40, num_layers=2,
                   cross_attn_norm=False, rope_max_seq_len=32)),
    # Wan I2V layout: image tokens + 512 text tokens, added K/V projections
    "i2v": dict(latent=(2, 4, 4), cfg=dict(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=10,
                added_kv_proj_dim=24, rope_max_seq_len=16)),
}


def _pair(cfg):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    ours = VideoDiT(**cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg, latent, batch=2, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *latent, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, text_len if not cfg.get("image_dim") else 512, cfg["text_dim"], generator=g)
    extra = {}
    if cfg.get("image_dim"):
        extra["encoder_hidden_states_image"] = torch.randn(batch, 5, cfg["image_dim"], generator=g)
    return x, t, ctx, extra


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_keys_and_same_output_as_diffusers(name):
    case = CONFIGS[name]
    ref, ours = _pair(case["cfg"])
    assert list(ref.state_dict()) == list(ours.state_dict())
    x, t, ctx, extra = _inputs(case["cfg"], case["latent"])
    with torch.no_grad():
        want = ref(x, t, ctx, **extra).sample
        got = ours(x, t, ctx, **extra).sample
    assert got.shape == want.shape == (2, case["cfg"]["out_channels"], *case["latent"])
    assert want.abs().mean() > 0.1  # a real signal, not zeros
    assert _rel(got, want) <= 1e-5


def test_per_token_timesteps_match_diffusers():
    case = CONFIGS["odd-nonsquare"]
    ref, ours = _pair(case["cfg"])
    x, _, ctx, _ = _inputs(case["cfg"], case["latent"])
    t = torch.rand(2, 3 * 3 * 5) * 1000  # (B, L): Wan 2.2 / diffusion-forcing style
    with torch.no_grad():
        assert _rel(ours(x, t, ctx).sample, ref(x, t, ctx).sample) <= 1e-5


def test_return_dict_false_gives_a_tuple():
    case = CONFIGS["odd-nonsquare"]
    _, ours = _pair(case["cfg"])
    x, t, ctx, _ = _inputs(case["cfg"], case["latent"])
    with torch.no_grad():
        out = ours(x, t, ctx, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], ours(x, t, ctx).sample)


def test_checkpoints_load_both_ways(tmp_path):
    case = CONFIGS["odd-nonsquare"]
    ref, ours = _pair(case["cfg"])
    x, t, ctx, _ = _inputs(case["cfg"], case["latent"])
    with torch.no_grad():
        want = ref(x, t, ctx).sample

    ref.save_pretrained(tmp_path / "from_diffusers")
    loaded = VideoDiT.from_pretrained(tmp_path / "from_diffusers").eval()
    ours.save_pretrained(tmp_path / "from_vdiff")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "from_vdiff").eval()
    with torch.no_grad():
        assert _rel(loaded(x, t, ctx).sample, want) <= 1e-5
        assert _rel(back(x, t, ctx).sample, want) <= 1e-5
    assert model_config_of(loaded) == ModelConfig(**{**ModelConfig().to_diffusers(), **case["cfg"]})


def test_gradient_checkpointing_gives_the_same_gradients():
    case = CONFIGS["odd-nonsquare"]
    _, ours = _pair(case["cfg"])
    ours.train()
    x, t, ctx, _ = _inputs(case["cfg"], case["latent"])

    def grads():
        ours.zero_grad(set_to_none=True)
        ours(x, t, ctx).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    ours.enable_gradient_checkpointing()
    assert ours.gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(ours.parameters()))
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


class _ShuffledDense(AttentionBackend):
    """Dense attention that asks for a random token order: the model must undo it exactly."""

    name = "test_shuffled_dense"
    sparse = True

    def token_order(self, grid, config):
        t, h, w = grid
        return torch.randperm(t * h * w, generator=torch.Generator().manual_seed(7))

    def forward(self, q, k, v, ctx):
        return sdpa_attention(q, k, v)


def test_token_order_hook_is_applied_and_undone(request):
    register_backend(_ShuffledDense())
    request.addfinalizer(lambda: unregister_backend("test_shuffled_dense"))
    case = CONFIGS["odd-nonsquare"]
    _, ours = _pair(case["cfg"])
    x, t, ctx, _ = _inputs(case["cfg"], case["latent"])
    stats = AttentionStats()
    with torch.no_grad():
        dense = ours(x, t, ctx).sample
        shuffled = ours(x, t, ctx, attention_kwargs={"attention": AttentionConfig(backend="test_shuffled_dense"),
                                                     "stats": stats}).sample
    assert stats.by_backend == {"test_shuffled_dense": 2}  # both layers ran the requested backend
    assert _rel(shuffled, dense) <= 1e-5


def test_tiny_preset_runs_with_pixel_vae_shapes():
    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=1)).eval()
    x = torch.randn(1, 48, 16, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), torch.randn(1, 32, 384)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_pixel_vae_for_channels_is_the_exact_patch_inverse():
    from vdiff.models.vae import PixelPatchVAE

    assert [PixelPatchVAE.for_channels(c).stride for c in (3, 12, 48)] == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    video = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    vae = PixelPatchVAE.for_channels(48)
    z = vae.encode(video)
    assert z.shape == (2, 48, 4, 2, 2) and torch.equal(vae.decode(z), video)
    assert torch.equal(z[:, :, 0, 0, 0].reshape(2, 3, 4, 4), video[:, :, 0, :4, :4])  # channel = (rgb, row, col)
    for bad in (0, 2, 47):
        with pytest.raises(ValueError, match=f"{bad} latent channels"):
            PixelPatchVAE.for_channels(bad)


def test_bad_attention_requests_fail_early():
    model = VideoDiT(**CONFIGS["odd-nonsquare"]["cfg"])
    with pytest.raises(RuntimeError, match="xformers"):
        model.set_attention(AttentionConfig(kernel="xformers"))
    x, t, ctx, _ = _inputs(CONFIGS["odd-nonsquare"]["cfg"], CONFIGS["odd-nonsquare"]["latent"])
    with pytest.raises(TypeError, match="unknown attention_kwargs"):
        model(x, t, ctx, attention_kwargs={"steps": 3})


def test_absolute_position_embedding_option():
    """`abs_pos_embed` (vdiff's option, off = Wan): the table is the documented sin-cos of each token's (t, h, w)
    index, added after the patch embedding times a learned per-channel gain: with the gain at 0 the model is exactly
    the same weights without the option, with its initial 1 the output changes; Wan kwargs refuse the option."""
    import math

    from vdiff.config import ConfigError
    from vdiff.models.layers import absolute_position_table, rope_axis_dims

    grid, dim = (3, 4, 5), 36
    table = absolute_position_table(grid, dim, "cpu")  # (60, 36)
    dt, dh, dw = rope_axis_dims(dim)
    t, h, w = 2, 1, 3
    row = table[(t * grid[1] + h) * grid[2] + w]
    assert math.isclose(row[0].item(), math.sin(t * 1.0), abs_tol=1e-6)  # first t channel: sin(t * 1)
    assert math.isclose(row[dt // 2].item(), math.cos(t * 1.0), abs_tol=1e-6)
    f1 = 1.0 / 10000 ** (2 / dh)  # second h frequency
    assert math.isclose(row[dt + 1].item(), math.sin(h * f1), abs_tol=1e-6)
    assert math.isclose(row[dt + dh + dw // 2].item(), math.cos(w * 1.0), abs_tol=1e-6)

    torch.manual_seed(0)
    cfg = model_preset("tiny", num_layers=2)
    plain = VideoDiT.from_model_config(cfg).eval()
    with_pe = VideoDiT.from_model_config(dataclasses_replace(cfg, abs_pos_embed=True)).eval()
    missing, unexpected = with_pe.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["pos_embed_gain"] and unexpected == []
    x, ts, text = torch.randn(1, 48, 3, 8, 8), torch.tensor([700.0]), torch.randn(1, 6, 384)
    assert torch.equal(with_pe.pos_embed_gain, torch.ones(cfg.hidden_size))
    with torch.no_grad():
        base = plain(x, ts, text, return_dict=False)[0]
        moved = with_pe(x, ts, text, return_dict=False)[0]
        with_pe.pos_embed_gain.zero_()
        assert torch.equal(with_pe(x, ts, text, return_dict=False)[0], base)  # gain 0: exactly the plain model
    assert (moved - base).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="abs_pos_embed"):
        dataclasses_replace(cfg, abs_pos_embed=True).to_diffusers()
    assert "abs_pos_embed" not in cfg.to_diffusers()


def test_absolute_position_embedding_round_trip(tmp_path):
    torch.manual_seed(1)
    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=1, abs_pos_embed=True))
    with torch.no_grad():
        model.pos_embed_gain.normal_()
    model.save_pretrained(tmp_path / "m")
    loaded = VideoDiT.from_pretrained(tmp_path / "m")
    assert model_config_of(loaded).abs_pos_embed is True
    assert torch.equal(loaded.pos_embed_gain, model.pos_embed_gain)


def test_checkpoints_from_before_text_pool_removal(tmp_path):
    """`text_pool` was removed (a measured negative result): a saved config with `"text_pool": null` (the bundled
    checkpoint has one) loads as the same model without a word; one that used the option refuses with the reason."""
    import json

    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=1)).eval()
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps(config | {"text_pool": None}))
    loaded = VideoDiT.from_pretrained(tmp_path / "old").eval()
    assert "text_pool" not in loaded.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    (tmp_path / "old" / "config.json").write_text(json.dumps(config | {"text_pool": "attn"}))
    with pytest.raises(ValueError, match="text_pool='attn'.*no longer"):
        VideoDiT.from_pretrained(tmp_path / "old")


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)
