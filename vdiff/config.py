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
class CausalConfig:
    """Block-causal generation (long video), vdiff's own option (None = the bidirectional model, exactly Wan).

    The latent frames are cut into chunks of `chunk_frames`; a chunk attends to itself, to the first `sink_chunks`
    chunks (kept forever) and to the `window_chunks` chunks before it (None: every earlier chunk). `rope`:
    "absolute" rotates keys at their absolute frame positions (length bounded by `rope_max_seq_len` frames);
    "window" places the attended chunks at consecutive positions (sinks first, the current chunk last), so positions
    never exceed sink + window + 1 chunks and length is unbounded. Training and sampling use the same rule."""

    chunk_frames: int = 2
    sink_chunks: int = 1
    window_chunks: int | None = 2
    rope: Literal["absolute", "window"] = "window"

    def __post_init__(self) -> None:
        for name, lo in (("chunk_frames", 1), ("sink_chunks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"model.causal.{name} must be an int >= {lo}, got {value!r}")
        w = self.window_chunks
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ConfigError(f"model.causal.window_chunks must be null (every earlier chunk) or an int >= 0, "
                              f"got {w!r}")
        if self.rope not in ("absolute", "window"):
            raise ConfigError(f"model.causal.rope must be 'absolute' or 'window', got {self.rope!r}")

    @property
    def finite(self) -> bool:
        """Whether a chunk attends a bounded number of chunks (its cost per chunk is flat)."""
        return self.window_chunks is not None


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
    # vdiff's own option (None = exactly Wan): chunk-by-chunk block-causal generation (vdiff.models.causal)
    causal: CausalConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.causal, dict):
            self.causal = CausalConfig(**self.causal)
        if self.causal is not None and self.causal.chunk_frames % self.patch_size[0]:
            raise ConfigError(f"model.causal.chunk_frames={self.causal.chunk_frames} must be a multiple of the "
                              f"temporal patch size {self.patch_size[0]}")
        if self.attention_head_dim % 2:
            raise ConfigError(
                f"model.attention_head_dim must be even (RoPE pairs channels), got {self.attention_head_dim}"
            )
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
        if kwargs.pop("causal") is not None:
            raise ConfigError("model.causal has no Wan/diffusers equivalent (WanTransformer3DModel is bidirectional)")
        return kwargs

    def to_vdiff(self) -> dict[str, Any]:
        """The kwargs of `VideoDiT(**kwargs)`: Wan's fields plus vdiff's own (`abs_pos_embed`)."""
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # For tests and CPU demos: ~1.3M parameters; text_dim matches the packaged MiniLM encoder (384-d); 48 channels =
    # PixelPatchVAE with stride (1, 4, 4), so a 16 x 32 x 32 clip is a (16, 4, 4) grid of 256 tokens.
    "tiny": ModelConfig(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=48, out_channels=48,
        text_dim=384, freq_dim=64, ffn_dim=256, num_layers=4, rope_max_seq_len=256,
    ),
    # Wan2.1 T2V 1.3B and 14B: the published shapes (UMT5-XXL text, 16-channel VAE latents).
    "wan2.1-1.3b": ModelConfig(
        num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096
    ),
    "wan2.1-14b": ModelConfig(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096
    ),
}


def model_preset(name: str, **changes: Any) -> ModelConfig:
    """A named model size, optionally with some fields changed: `model_preset("tiny", num_layers=2)`."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **changes)


# --------------------------------------------------------------------------------------------------------------------
# Attention: which backend runs self-attention, and the options of each sparse method.
# --------------------------------------------------------------------------------------------------------------------


RADIAL_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _positive_ints(section: str, name: str, value: Any, n: int) -> tuple[int, ...]:
    """`value` as a tuple of `n` ints >= 1, or a ConfigError naming attention.<section>.<name>."""
    items = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(items) != n or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in items):
        axes = "(t, h, w)" if n == 3 else "(h, w)"
        raise ConfigError(f"attention.{section}.{name} must be {n} integers {axes}, each >= 1, got {value!r}")
    return items


@dataclass
class RadialConfig:
    """Radial attention (vdiff.attention.radial): band width decay over temporal distance, kernel block, frame-0
    sink."""

    decay_factor: float = 1.0
    block_size: int = 128
    sink: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.decay_factor, bool) or not isinstance(self.decay_factor, (int, float)) \
                or not self.decay_factor > 0:
            raise ConfigError(f"attention.radial.decay_factor must be a number > 0, got {self.decay_factor!r}")
        self.decay_factor = float(self.decay_factor)
        if self.block_size not in RADIAL_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ConfigError(f"attention.radial.block_size must be one of {list(RADIAL_BLOCK_SIZES)}, "
                              f"got {self.block_size!r}")
        if not isinstance(self.sink, bool):
            raise ConfigError(f"attention.radial.sink must be true or false, got {self.sink!r}")


@dataclass
class SlidingTileConfig:
    """Sliding tile attention (vdiff.attention.sliding_tile): tile extent in tokens, window in tiles, per (t, h, w)."""

    tile: tuple[int, int, int] = (6, 8, 8)
    window: tuple[int, int, int] = (3, 3, 3)

    def __post_init__(self) -> None:
        self.tile = _positive_ints("sliding_tile", "tile", self.tile, 3)  # type: ignore[assignment]
        self.window = _positive_ints("sliding_tile", "window", self.window, 3)  # type: ignore[assignment]


@dataclass
class VMoBAConfig:
    """VMoBA (vdiff.attention.vmoba): chunk sizes of the 1D / 2D / 3D partitions and how chunks are selected."""

    chunk_t: int = 2
    chunk_hw: tuple[int, int] = (8, 8)
    chunk_thw: tuple[int, int, int] = (2, 8, 8)
    select: Literal["topk", "threshold"] = "topk"
    topk: int = 3
    threshold: float = 0.25
    global_select: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.chunk_t, bool) or not isinstance(self.chunk_t, int) or self.chunk_t < 1:
            raise ConfigError(f"attention.vmoba.chunk_t must be an int >= 1, got {self.chunk_t!r}")
        self.chunk_hw = _positive_ints("vmoba", "chunk_hw", self.chunk_hw, 2)  # type: ignore[assignment]
        self.chunk_thw = _positive_ints("vmoba", "chunk_thw", self.chunk_thw, 3)  # type: ignore[assignment]
        if self.select not in ("topk", "threshold"):
            raise ConfigError(f"attention.vmoba.select must be 'topk' or 'threshold', got {self.select!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ConfigError(f"attention.vmoba.topk must be an int >= 1, got {self.topk!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"attention.vmoba.threshold must be in (0, 1], got {self.threshold!r}")
        if not isinstance(self.global_select, bool):
            raise ConfigError(f"attention.vmoba.global_select must be true or false, got {self.global_select!r}")


@dataclass
class AttentionConfig:
    """Self-attention backend. `backend` is dense | radial | vmoba | sliding_tile.

    `kernel` picks the dense kernel (sdpa | flex | xformers | flash); it is also what dense layers and dense
    warm-up steps of a sparse backend run. `impl` picks a sparse method's implementation: fast (block-sparse
    FlexAttention kernels), gather (pure PyTorch, backward on any device; radial / sliding_tile: dense SDPA over
    gathered key blocks, VMoBA: its varlen path), reference (explicit mask + SDPA) or auto (CPU: gather; GPU: fast
    where it can run the call, else gather; never reference; reported by `vdiff.attention.available()`).
    The options of each sparse method check themselves when built, so a bad value fails at load, naming its key.
    """

    backend: str = "dense"
    kernel: str = "sdpa"
    impl: Literal["auto", "fast", "gather", "reference"] = "auto"
    dense_layers: list[int] = field(default_factory=list)
    dense_steps: int = 0
    radial: RadialConfig = field(default_factory=RadialConfig)
    sliding_tile: SlidingTileConfig = field(default_factory=SlidingTileConfig)
    vmoba: VMoBAConfig = field(default_factory=VMoBAConfig)

    @classmethod
    def named(cls, name: str) -> AttentionConfig:
        """The config one name asks for: "dense", a dense kernel ("sdpa", "flex", ...) or a sparse backend ("radial",
        ...), with default options. An unknown name is a ConfigError listing the known ones."""
        from vdiff.attention.registry import DENSE_KERNELS, backend_names

        if name in DENSE_KERNELS:
            return cls(kernel=name)
        if name not in backend_names():
            raise ConfigError(f"attention: unknown attention backend {name!r}; choose one of {backend_names()} or a "
                              f"dense kernel {list(DENSE_KERNELS)}")
        return cls(backend=name)

    def __post_init__(self) -> None:
        if self.dense_steps < 0:
            raise ConfigError(f"attention.dense_steps must be >= 0, got {self.dense_steps}")
        from vdiff.attention.registry import check_names  # the registry knows which names exist (late: no cycle)

        check_names(self)


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
        raise ConfigError(_qualify(prefix, str(err))) from None


def _qualify(prefix: str, message: str) -> str:
    """Put the dotted `prefix` in front of a config class's own message, which may already start with the tail of it
    (`attention.radial.block_size ...` under the prefix `model.attention.radial.` ->
    `model.attention.radial.block_size`)."""
    if not prefix or message.startswith(prefix):
        return message
    parts = prefix.rstrip(".").split(".")
    for i in range(len(parts)):
        tail = ".".join(parts[i:]) + "."
        if message.startswith(tail):
            return prefix + message[len(tail):]
    return prefix + message


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
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and dataclasses.is_dataclass(members[0]) and isinstance(value, dict):
            raise ConfigError(errors[0])  # an optional section: its own error names the key inside it
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
