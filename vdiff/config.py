"""Typed configs: dataclasses are the schema, YAML files and `key=value` overrides only change fields.

    cfg = load_config("configs/train/tiny.yaml", overrides=["train.max_steps=10"])

An unknown key or a value of the wrong type raises `ConfigError` naming the dotted key. Model sizes are named
presets (`MODEL_PRESETS`); a YAML `model: {preset: tiny, num_layers: 2}` starts from the preset and changes one
field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type or range."""


# --------------------------------------------------------------------------------------------------------------------
# Model: the fields and names of diffusers' WanTransformer3DModel, so configs and checkpoints are interchangeable.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    # vdiff's own option, not Wan's (off = exactly Wan): add a fixed 3D sin-cos embedding of each token's absolute
    # (t, h, w) index, scaled by a learned per-channel gain (starts at 1). RoPE positions are relative only, so a
    # model sees absolute placement only through slow-to-learn border effects; small models trained from scratch on
    # layout-from-text tasks (the bundled ShapesWorld model: "moving left" from pure noise) learn it with this.
    abs_pos_embed: bool = False
    # vdiff's own option, not Wan's (None = exactly Wan): also condition adaLN on the caption, as DiT does with its
    # class label and SD3/Flux with a pooled text vector. "attn": one learned query per head attends over the projected
    # text tokens (padding, the all-zero rows, excluded); "mean": their mean. The pooled vector is added to the
    # timestep embedding, so every block's shift/scale/gate depends on the caption: a caption-dependent scale of
    # features that already depend on position gives a position x caption product at first order (what "moving
    # left" needs at high noise), where cross-attention alone adds a caption vector the same at every position.
    text_pool: str | None = None

    def __post_init__(self) -> None:
        if self.text_pool not in (None, "attn", "mean"):
            raise ConfigError(f"model.text_pool must be null, 'attn' or 'mean', got {self.text_pool!r}")
        if self.attention_head_dim % 2:
            raise ConfigError(f"model.attention_head_dim must be even (RoPE pairs channels), got {self.attention_head_dim}")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "ffn_dim", "num_layers", "freq_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size must be three positive ints (t, h, w), got {self.patch_size}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_diffusers(self) -> dict[str, Any]:
        """The kwargs of diffusers' `WanTransformer3DModel(**kwargs)` (Wan's fields only)."""
        kwargs = dataclasses.asdict(self)
        if kwargs.pop("abs_pos_embed"):
            raise ConfigError("model.abs_pos_embed=true has no Wan/diffusers equivalent (WanTransformer3DModel)")
        if kwargs.pop("text_pool") is not None:
            raise ConfigError("model.text_pool has no Wan/diffusers equivalent (WanTransformer3DModel)")
        return kwargs

    def to_vdiff(self) -> dict[str, Any]:
        """The kwargs of `VideoDiT(**kwargs)`: Wan's fields plus vdiff's own (`abs_pos_embed`, `text_pool`)."""
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # For tests and CPU demos: ~1.3M parameters; text_dim matches the packaged MiniLM encoder (384-d); 48 channels =
    # PixelPatchVAE with stride (1, 4, 4), so a 16 x 32 x 32 clip is a (16, 4, 4) grid of 256 tokens.
    "tiny": ModelConfig(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=48, out_channels=48,
        text_dim=384, freq_dim=64, ffn_dim=256, num_layers=4, rope_max_seq_len=256,
    ),
    # Wan2.1 T2V 1.3B and 14B: the published shapes (UMT5-XXL text, 16-channel VAE latents).
    "wan2.1-1.3b": ModelConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096),
    "wan2.1-14b": ModelConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096),
}


def model_preset(name: str, **changes: Any) -> ModelConfig:
    """A named model size, optionally with some fields changed: `model_preset("tiny", num_layers=2)`."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **changes)


# --------------------------------------------------------------------------------------------------------------------
# Attention: which backend runs self-attention, and the options of each sparse method.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RadialConfig:
    decay_factor: float = 1.0
    block_size: int = 128
    sink: bool = True


@dataclass
class SlidingTileConfig:
    tile: tuple[int, int, int] = (6, 8, 8)
    window: tuple[int, int, int] = (3, 3, 3)


@dataclass
class VMoBAConfig:
    chunk_t: int = 2
    chunk_hw: tuple[int, int] = (8, 8)
    chunk_thw: tuple[int, int, int] = (2, 8, 8)
    select: Literal["topk", "threshold"] = "topk"
    topk: int = 3
    threshold: float = 0.25
    global_select: bool = False


@dataclass
class AttentionConfig:
    """Self-attention backend. `backend` is dense | radial | vmoba | sliding_tile.

    `kernel` picks the dense kernel (sdpa | flex | xformers | flash); it is also what dense layers and dense
    warm-up steps of a sparse backend run. `impl` picks a sparse method's implementation: fast (block-sparse
    FlexAttention kernels), gather (pure PyTorch, backward on any device; radial / sliding_tile: dense SDPA over
    gathered key blocks, VMoBA: its varlen path), reference (explicit mask + SDPA) or auto (CPU: gather; GPU: fast
    where it can run the call, else reference; reported by `vdiff.attention.available()`).
    """

    backend: str = "dense"
    kernel: str = "sdpa"
    impl: Literal["auto", "fast", "gather", "reference"] = "auto"
    dense_layers: list[int] = field(default_factory=list)
    dense_steps: int = 0
    radial: RadialConfig = field(default_factory=RadialConfig)
    sliding_tile: SlidingTileConfig = field(default_factory=SlidingTileConfig)
    vmoba: VMoBAConfig = field(default_factory=VMoBAConfig)

    def __post_init__(self) -> None:
        if self.dense_steps < 0:
            raise ConfigError(f"attention.dense_steps must be >= 0, got {self.dense_steps}")


# --------------------------------------------------------------------------------------------------------------------
# Loading: dicts / YAML / dotted overrides -> dataclasses, with errors that name the key.
# --------------------------------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: dict[str, Any] | None, *, base: T | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, starting from `base` (or the defaults). Unknown keys and wrong types raise."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    if cls is ModelConfig and "preset" in data:  # a named size, then field changes on top of it
        base = model_preset(data.pop("preset"))  # type: ignore[assignment]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; {cls.__name__} has: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        current = getattr(base, name) if base is not None else _default(fields[name])
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}", current)
        else:
            kwargs[name] = current
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, current: Any = None) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, base=current if dataclasses.is_dataclass(current) else None, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, current)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (tuples become lists), suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["train.max_steps=10", "model.attention.backend=radial"]` -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `b` wins."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then dotted `key=value` overrides."""
    data = load_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(list(overrides)))
    return from_dict(cls, data)
