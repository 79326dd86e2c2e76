"""What diffusers' pipelines and tools expect of a transformer, on VideoDiT (a mixin; the model file stays the model).

    pipe = diffusers.WanPipeline(transformer=VideoDiT.from_single_file("wan2.1_t2v_1.3B.safetensors"), ...)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))     # diffusers' hooks on VideoDiT's blocks
    pipe.load_lora_weights("lora_dir")                                       # PEFT adapters (PeftAdapterMixin)
    pipe.transformer.compile_repeated_blocks()                               # torch.compile per VideoDiTBlock

Supported: `cache_context` / `enable_cache` / `disable_cache` (CacheMixin) with the diffusers caches that only hook
whole transformer blocks (FirstBlockCache, MagCache: VideoDiT's blocks are registered with diffusers' block registry,
their `x` read as diffusers' `hidden_states`); LoRA (PeftAdapterMixin: load_lora_adapter, set_adapters, fuse_lora,
...); `compile_repeated_blocks`; layerwise casting and group offloading (ModelMixin, `_no_split_modules` and
`_skip_layerwise_casting_patterns` as Wan); `set_attention_backend` for the dense backends vdiff has a kernel for
(native, flex, xformers, flash: they become the self-attention kernel of vdiff's seam); `from_single_file` for the
original Wan2.1 layout.

Refused with the reason (a call that silently did nothing would leave a user believing it worked): diffusers caches
that hook diffusers' own `Attention` modules or Wan-specific internals (PyramidAttentionBroadcast, FasterCache,
TaylorSeer, SeaCache, diffusers' TextKVCache: vdiff's `step` and `text_kv` caches do these jobs), the other
attention backends (sage, cudnn, ...: `set_attention` chooses vdiff's), attention processors (VideoDiT has none: its
attention is the vdiff seam), and `enable_parallelism` (context parallel needs a `_cp_plan` over diffusers'
attention; vdiff's sequence parallel is `vdiff.parallel.apply_sequence_parallel`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.cache_utils import CacheMixin

# diffusers' attention backend name -> vdiff's dense kernel (vdiff.attention.registry.DENSE_KERNELS)
ATTENTION_BACKENDS = {"native": "sdpa", "flex": "flex", "xformers": "xformers", "flash": "flash"}
# diffusers cache configs that work on VideoDiT: they hook whole blocks only
BLOCK_CACHES = (FirstBlockCacheConfig, MagCacheConfig)
# the vdiff cache that does what a refused diffusers cache does
VDIFF_EQUIVALENT = {"TextKVCacheConfig": "text_kv"}


@dataclass
class _VideoDiTBlockMetadata(TransformerBlockMetadata):
    """diffusers' block hooks ask for `hidden_states` / `encoder_hidden_states`; VideoDiTBlock calls them `x` /
    `context` (it is called as block(x, context=..., temb=..., rope=..., ctx=...) and returns x)."""

    def _get_parameter_from_args_kwargs(self, identifier: str, args=(), kwargs=None):
        name = {"hidden_states": "x", "encoder_hidden_states": "context"}.get(identifier, identifier)
        return super()._get_parameter_from_args_kwargs(name, args, kwargs)


def register_block(block_class: type) -> None:
    """Tell diffusers' block-level caches how to read a VideoDiT block (output: the hidden states, alone)."""
    TransformerBlockRegistry.register(block_class, _VideoDiTBlockMetadata(
        return_hidden_states_index=0, return_encoder_hidden_states_index=None, hidden_states_argument_name="x"))


class DiffusersInterop(PeftAdapterMixin, CacheMixin):
    """Mixed into VideoDiT before ModelMixin, so the methods here win over ModelMixin's generic ones."""

    _repeated_blocks = ["VideoDiTBlock"]

    def enable_cache(self, config: Any) -> None:
        """diffusers' `CacheMixin.enable_cache` for the block-level caches (FirstBlockCacheConfig, MagCacheConfig);
        any other diffusers cache config is refused, naming the vdiff cache that does its job."""
        if isinstance(config, BLOCK_CACHES):
            for block_class in {type(block) for block in self.blocks}:
                register_block(block_class)
            return super().enable_cache(config)
        name = type(config).__name__
        vdiff_cache = VDIFF_EQUIVALENT.get(name, "step")
        raise ValueError(
            f"VideoDiT: diffusers' {name} cannot run on VideoDiT (it hooks diffusers' own attention modules or "
            f"model internals, which VideoDiT does not have); supported diffusers caches: "
            f"{[c.__name__ for c in BLOCK_CACHES]}. vdiff's own '{vdiff_cache}' cache does this job: "
            f"VideoPipeline.enable_cache('{vdiff_cache}') or vdiff.cache.apply_cache(model, config)")

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' backend names that vdiff has a dense kernel for (native, flex, xformers, flash) become the
        kernel of the self-attention seam (`attention_config.kernel`; sparse backends keep their pattern). Checked
        now: a kernel that cannot run on this device raises. Cross-attention to the text stays SDPA."""
        kernel = ATTENTION_BACKENDS.get(str(backend).lower())
        if kernel is None:
            raise ValueError(
                f"VideoDiT: diffusers attention backend {backend!r} is not one vdiff runs; supported: "
                f"{sorted(ATTENTION_BACKENDS)}. VideoDiT's attention is chosen with model.set_attention(...) (a "
                "vdiff backend name such as 'dense', 'sdpa', 'radial', or an AttentionConfig)")
        self.set_attention(dataclasses.replace(self.attention_config, kernel=kernel))

    def reset_attention_backend(self) -> None:
        self.set_attention(dataclasses.replace(self.attention_config, kernel="sdpa"))

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """`enable_xformers_memory_efficient_attention()` (ModelMixin / pipelines): the xformers kernel, for real."""
        if attention_op is not None:
            raise ValueError("VideoDiT: xformers attention_op cannot be chosen; vdiff's xformers kernel picks it")
        self.set_attention_backend("xformers") if valid else self.reset_attention_backend()

    @property
    def attn_processors(self) -> dict:
        raise AttributeError("VideoDiT has no diffusers attention processors: its attention goes through vdiff's "
                             "seam, chosen with model.set_attention(...)")

    def set_attn_processor(self, processor: Any) -> None:
        raise NotImplementedError("VideoDiT has no diffusers attention processors: choose its attention with "
                                  "model.set_attention(AttentionConfig(...)) or register a vdiff backend")

    def enable_parallelism(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("VideoDiT: diffusers' context parallelism needs diffusers attention modules; "
                                  "use vdiff.parallel.apply_sequence_parallel(model, group) (Ulysses)")

    @classmethod
    def from_single_file(cls, path: str | Path, config: dict[str, Any] | str | Path | None = None,
                         torch_dtype: torch.dtype | None = None, **overrides: Any):
        """A VideoDiT from one original-layout Wan2.1 checkpoint (`.safetensors` as the Wan repository ships it).

        config: None (read off the tensor shapes, 128-dim heads as every Wan2.1 model), a dict of config fields, or
        a diffusers transformer folder / config.json; `overrides` change single fields. Every tensor must fit."""
        from vdiff.models.single_file import config_from_original, read_original

        state = read_original(path)
        if isinstance(config, (str, Path)):
            folder = Path(config)
            config = cls.load_config(folder.parent if folder.name == "config.json" else folder)
        if config is not None:
            config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
            config = {**config, **overrides}
        else:
            config = config_from_original(state, **overrides)
        model = cls.from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "pos_embed_gain"]  # vdiff's own option keeps its initial gain of 1
        if missing or unexpected:
            raise ValueError(f"{path}: the checkpoint does not fit config {config}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()
