"""LoRA adapters (PEFT) on a VideoDiT: train them, save them in diffusers' LoRA format, load, scale, fuse, unload.

    add_lora(model, LoraConfig(rank=16))          # base frozen, adapters trainable (train.lora)
    save_lora(model, folder)                      # folder/pytorch_lora_weights.safetensors, keys `transformer.…`
    load_lora(model, "lora_dir" or "x.safetensors", adapter_name="style")

The file is what `WanPipeline.save_lora_weights` writes (keys `transformer.blocks.0.attn1.to_q.lora_A.weight`, the
adapter's LoraConfig in the safetensors metadata), so `diffusers.WanPipeline.load_lora_weights` reads vdiff's
adapters and vdiff reads diffusers' (and the original-Wan / musubi LoRA layouts diffusers converts). VideoDiT has
Wan's module names, so a LoRA made on a WanTransformer3DModel lands on the same layers. Adapters wrap the Linear
layers; attention still goes through vdiff's seam, so LoRA works with every attention backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vdiff.config import ConfigError
from vdiff.parallel.spawn import dispatched

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections of every block


@dataclass
class LoraConfig:
    """`train.lora`: adapters of rank `rank` on the Linear layers whose names end in one of `target_modules`;
    output scale alpha / rank (alpha None = rank, scale 1)."""

    rank: int = 16
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be an int >= 1, got {self.rank!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0 or None (= rank), got {self.alpha!r}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module (e.g. to_q)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    def peft_config(self):
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, target_modules=list(self.target_modules),
                              lora_dropout=self.dropout, init_lora_weights=True)


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
             seed: int | None = None) -> list[nn.Parameter]:
    """Freeze `model` and add a fresh adapter (lora_B = 0: the model's output is unchanged until it trains; lora_A
    drawn from `seed` when given, so every process and every run starts from the same adapter).
    Returns the trainable parameters (the adapter's)."""
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model.add_adapter(config.peft_config(), adapter_name=adapter_name)
    params = trainable_parameters(model)
    if not params:
        raise ConfigError(f"lora.target_modules={config.target_modules} matched no Linear layer of the model")
    return params


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def has_lora(model: nn.Module) -> bool:
    """Whether PEFT adapter layers are in the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def is_fused(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules())


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {}) if has_lora(model) else []


def _one_adapter(model: nn.Module, adapter_name: str | None) -> str:
    names = adapter_names(model)
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"no LoRA adapter {adapter_name!r} on the model (loaded: {names})")
        return adapter_name
    if len(names) != 1:
        raise ValueError(f"the model has {len(names)} LoRA adapters {names}: name the one to save")
    return names[0]


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers' names, no `transformer.` prefix (`blocks.0.attn1.to_q.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    name = _one_adapter(model, adapter_name)
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def save_lora(model: nn.Module, folder: str | Path, adapter_name: str | None = None) -> Path:
    """Write folder/pytorch_lora_weights.safetensors as `WanPipeline.save_lora_weights` does (with the adapter's
    config as metadata, so rank and alpha load back exactly)."""
    from diffusers.loaders import WanLoraLoaderMixin

    name = _one_adapter(model, adapter_name)
    folder = Path(folder)
    WanLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(model, name),
                                         transformer_lora_adapter_metadata=model.peft_config[name].to_dict())
    return folder / LORA_WEIGHT_NAME


def read_lora(path: str | Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A LoRA file (or a folder holding pytorch_lora_weights.safetensors) in any layout diffusers reads for Wan,
    as diffusers' `transformer.`-prefixed state dict and its metadata."""
    from diffusers.loaders import WanLoraLoaderMixin

    path = Path(path)
    if path.is_dir():
        where, weight_name = path, LORA_WEIGHT_NAME
        if not (path / weight_name).is_file():
            raise FileNotFoundError(f"LoRA folder {path} has no {LORA_WEIGHT_NAME}")
    elif path.is_file():
        where, weight_name = path.parent, path.name
    else:
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    state, metadata = WanLoraLoaderMixin.lora_state_dict(str(where), weight_name=weight_name, local_files_only=True,
                                                         return_lora_metadata=True)
    other = sorted({k.split(".")[0] for k in state if not k.startswith("transformer.")})
    if other:
        raise ValueError(f"{path}: LoRA weights for {other}; vdiff applies LoRA to the transformer only")
    state = WanLoraLoaderMixin._maybe_expand_t2v_lora_for_i2v(transformer=model, state_dict=state)
    return state, metadata


def load_lora(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> str:
    """Inject the adapter at `path` into `model` (PEFT, unfused, active); returns its name ("default_N" unless
    given)."""
    from diffusers.utils.peft_utils import get_adapter_name

    if adapter_name is not None and adapter_name in adapter_names(model):
        raise ValueError(f"a LoRA adapter named {adapter_name!r} is already loaded; unload it or pick another name")
    state, metadata = read_lora(path, model)
    name = adapter_name or get_adapter_name(model)
    model.load_lora_adapter(state, prefix="transformer", adapter_name=name, metadata=metadata)
    return name


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights without its (unfused) adapters: what it was before `add_lora` / `load_lora`."""
    if is_fused(model):
        raise ValueError("the LoRA is fused into the weights: unfuse_lora() first, or unload_lora_weights() to keep "
                         "the fused weights as the model's own")
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def save_base_model(model: nn.Module, folder: str | Path) -> None:
    """`model.save_pretrained(folder)` without its adapters (a model with PEFT layers would write their keys)."""
    if not has_lora(model):
        model.save_pretrained(folder)
        return
    with torch.device("meta"):
        base = type(model).from_config(model.config)
    base.load_state_dict(base_state_dict(model), strict=True, assign=True)
    base.save_pretrained(folder)


class LoraPipelineMixin:
    """LoRA on `VideoPipeline` (its transformer), diffusers' pipeline names:

        pipe.load_lora_weights("style_lora", adapter_name="style", scale=0.8)
        pipe.set_adapters(["style", "motion"], [0.8, 0.5])
        pipe.fuse_lora(); pipe.unfuse_lora()        # fused: the same video, no adapter cost per step
        pipe.unload_lora_weights()                  # the base model again, exactly (unless fused first: then kept)

    Adapters change the shared model: load them before serving calls (the server loads `--lora` at start)."""

    transformer: nn.Module
    _lock: Any

    @property
    def lora_adapters(self) -> dict[str, float]:
        """Active adapters and their scales."""
        scales = self.__dict__.setdefault("_lora_scales", {})
        if not has_lora(self.transformer):
            scales.clear()
            return scales
        for name in self.transformer.active_adapters():  # adapters added outside the pipeline (a training run's)
            scales.setdefault(name, 1.0)
        return scales

    @dispatched
    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Load a LoRA (diffusers' format, or any Wan LoRA layout diffusers converts) and activate it at `scale`
        next to the adapters already active. Returns the adapter's name."""
        with self._lock:
            name = load_lora(self.transformer, path, adapter_name)
            self.transformer.requires_grad_(False)
            scales = self.lora_adapters
            scales[name] = float(scale)
            self.transformer.set_adapters(list(scales), list(scales.values()))
        return name

    @dispatched
    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate exactly these adapters, with these scales (default 1 each); the others stay loaded, inactive."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [1.0] * len(names) if adapter_weights is None else adapter_weights
        weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapters but {len(weights)} weights")
        with self._lock:
            self.transformer.set_adapters(names, weights)
            self.__dict__["_lora_scales"] = {n: float(w) for n, w in zip(names, weights)}

    @dispatched
    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters (times `lora_scale`) into the weights."""
        with self._lock:
            self.transformer.fuse_lora(lora_scale=lora_scale, adapter_names=adapter_names)

    @dispatched
    def unfuse_lora(self) -> None:
        with self._lock:
            self.transformer.unfuse_lora()

    @dispatched
    def unload_lora_weights(self) -> None:
        """Remove every adapter. Unfused adapters leave the base weights untouched; fused ones stay in them."""
        with self._lock:
            if has_lora(self.transformer):
                self.transformer.unload_lora()
            self.__dict__["_lora_scales"] = {}

    def save_lora_weights(self, folder: str | Path, adapter_name: str | None = None) -> Path:
        """folder/pytorch_lora_weights.safetensors (diffusers' format) for one adapter."""
        return save_lora(self.transformer, folder, adapter_name)

    def _save_transformer(self, folder: Path) -> tuple[str, float] | None:
        """save_pretrained's transformer/: the base weights; with one unfused adapter active, it is written beside
        as pytorch_lora_weights.safetensors and (its name, scale) returned for the config. Several active adapters
        are refused (fuse them, or set_adapters one)."""
        save_base_model(self.transformer, folder / "transformer")
        if not has_lora(self.transformer):
            return None
        active = self.lora_adapters
        if len(active) != 1:
            raise ValueError(f"save_pretrained saves one LoRA adapter; active: {sorted(active)} (set_adapters one, or "
                             "fuse_lora() + unload_lora_weights() to save the merged weights)")
        (name, scale), = active.items()
        save_lora(self.transformer, folder, name)
        return name, scale
