import pytest

from vdiff.config import (
    MODEL_PRESETS,
    AttentionConfig,
    ConfigError,
    ModelConfig,
    from_dict,
    load_config,
    model_preset,
    parse_overrides,
    to_dict,
)


def test_presets_have_wan_shapes():
    small, big = MODEL_PRESETS["wan2.1-1.3b"], MODEL_PRESETS["wan2.1-14b"]
    assert (small.hidden_size, small.ffn_dim, small.num_layers, small.num_attention_heads) == (1536, 8960, 30, 12)
    assert (big.hidden_size, big.ffn_dim, big.num_layers, big.num_attention_heads) == (5120, 13824, 40, 40)
    for cfg in (small, big):
        assert cfg.patch_size == (1, 2, 2) and cfg.text_dim == 4096 and cfg.freq_dim == 256 and cfg.eps == 1e-6
        assert cfg.in_channels == cfg.out_channels == 16 and cfg.cross_attn_norm
    tiny = MODEL_PRESETS["tiny"]
    assert tiny.text_dim == 384 and tiny.in_channels == 48


def test_model_config_fields_are_diffusers_fields():
    import inspect

    from diffusers import WanTransformer3DModel

    wan = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    assert set(ModelConfig().to_diffusers()) == wan


def test_yaml_overrides_and_preset(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("preset: tiny\nnum_layers: 2\npatch_size: [1, 2, 2]\n")
    cfg = load_config(ModelConfig, path, overrides=["eps=1e-5", "ffn_dim=64"])
    assert cfg.num_layers == 2 and cfg.ffn_dim == 64 and cfg.eps == 1e-5
    assert cfg.num_attention_heads == MODEL_PRESETS["tiny"].num_attention_heads
    assert cfg.patch_size == (1, 2, 2) and isinstance(cfg.patch_size, tuple)


def test_nested_attention_config():
    cfg = from_dict(
        AttentionConfig, parse_overrides(["backend=radial", "radial.decay_factor=0.2", "dense_layers=[0, 1]"])
    )
    assert cfg.backend == "radial" and cfg.radial.decay_factor == 0.2 and cfg.dense_layers == [0, 1]
    assert cfg.radial.block_size == 128  # untouched fields keep their defaults
    assert from_dict(AttentionConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"num_layer": 2}, "num_layer"),
        ({"num_layers": "two"}, "num_layers: expected int"),
        ({"num_layers": 2.5}, "num_layers: expected int"),
        ({"cross_attn_norm": 1}, "cross_attn_norm: expected bool"),
        ({"patch_size": [1, 2]}, "patch_size: expected 3 values"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"attention_head_dim": 31}, "attention_head_dim must be even"),
    ],
)
def test_bad_model_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        from_dict(ModelConfig, data)


def test_nested_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"radial\.sink: expected bool"):
        from_dict(AttentionConfig, {"radial": {"sink": "yes"}})
    with pytest.raises(ConfigError, match=r"radial\.window"):
        from_dict(AttentionConfig, {"radial": {"window": 3}})
    with pytest.raises(ConfigError, match="impl: expected one of"):
        from_dict(AttentionConfig, {"impl": "quick"})
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["backend"])


def test_model_preset_changes_one_field():
    cfg = model_preset("wan2.1-1.3b", num_layers=2)
    assert cfg.num_layers == 2 and cfg.ffn_dim == 8960
    assert MODEL_PRESETS["wan2.1-1.3b"].num_layers == 30
