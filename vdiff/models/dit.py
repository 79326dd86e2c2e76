"""VideoDiT: the video diffusion transformer, weight- and config-compatible with diffusers' WanTransformer3DModel.

Same config fields, same state-dict keys, same forward signature and, in fp32 with dense attention, the same output,
so a Wan2.1 transformer saved in diffusers format loads with `VideoDiT.from_pretrained(path)` and diffusers'
pipelines can drive a VideoDiT. What differs is inside: self-attention goes through `vdiff.attention.dispatch`
(dense or sparse, chosen by an `AttentionConfig`), and tokens can be reordered once per forward for sparse kernels.

Shapes: B batch, C latent channels, (F, Hl, Wl) latent frames/height/width, (T, H, W) token grid after patching,
L = T*H*W tokens, D hidden size, N heads, Dh head dim, S text tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from vdiff.attention import AttentionContext, MaskCache, check_config, dispatch, token_order
from vdiff.attention.vmoba import VMOBA_CAUSAL
from vdiff.config import AttentionConfig, CausalConfig, ModelConfig
from vdiff.models.causal import causal_attention, layout_for
from vdiff.models.diffusers_interop import DiffusersInterop
from vdiff.models.layers import (
    FeedForward,
    FP32LayerNorm,
    ImageEmbedding,
    RotaryPosEmbed3D,
    TextProjection,
    TimestepEmbedding,
    absolute_position_table,
    apply_rope,
    timestep_embedding,
)

# Wan's I2V models append image tokens before a text context of this fixed length.
WAN_TEXT_LEN = 512

# --------------------------------------------------------------------------------------------------------------------
# Conditioning: timestep -> adaLN modulation, text (and image) projection
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSwitch:
    """Two texts in one forward (training prompt switches, `attention_kwargs["text_switch"]`): tokens where
    `second_tokens` (B, L) is True attend `second`, the others `first` (both projected, (B, S, D))."""

    first: torch.Tensor
    second: torch.Tensor
    second_tokens: torch.Tensor


class ConditionEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None, pos_embed_seq_len: int | None):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(text_dim, dim)
        self.image_embedder = ImageEmbedding(image_dim, dim, pos_embed_seq_len) if image_dim is not None else None

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None):
        t_freq = timestep_embedding(timestep.flatten(), self.freq_dim).view(*timestep.shape, -1)  # (B[, L], Ft)
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t_freq).type_as(text)  # (B[, L], D)
        projected = self.text_embedder(text)  # (B, S, D)
        temb_proj = self.time_proj(self.act_fn(temb))  # (B[, L], 6D)
        if image is not None:
            image = self.image_embedder(image)
        return temb, temb_proj, projected, image


# --------------------------------------------------------------------------------------------------------------------
# Attention: self-attention through the vdiff seam, cross-attention to the text (and image) tokens
# --------------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Projections of one attention layer (keys `to_q/k/v`, `to_out.0`, `norm_q/k` as Wan): RMS qk-norm across heads."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def out(self, o_BLHD: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.to_out[1](self.to_out[0](o_BLHD.flatten(2).type_as(like)))


class SelfAttention(Attention):
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw (un-rotated) q, k, v (B, L, N, Dh) of tokens x (B, L, D)."""
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))  # (B, L, N, Dh)
        k = self.norm_k(self.to_k(x)).unflatten(2, (self.heads, -1))  # (B, L, N, Dh)
        v = self.to_v(x).unflatten(2, (self.heads, -1))  # (B, L, N, Dh)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.project(x)
        if ctx.causal is not None:  # long video: chunk-by-chunk, each chunk at the positions it sees them
            o = causal_attention(q, k, v, ctx)  # (B, L, N, Dh)
        else:
            o = dispatch(apply_rope(q, *rope), apply_rope(k, *rope), v, ctx)  # (B, L, N, Dh)
        return self.out(o, q)  # (B, L, D)


class CrossAttention(Attention):
    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys/values (B, S, N, Dh): depend only on the prompt, so inference caches can reuse them."""
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.heads, -1))
        v = self.to_v(context).unflatten(2, (self.heads, -1))
        return k, v

    def image_kv(self, image_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_added_k(self.add_k_proj(image_context)).unflatten(2, (self.heads, -1))
        v = self.add_v_proj(image_context).unflatten(2, (self.heads, -1))
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | TextSwitch) -> torch.Tensor:
        """Tokens x (B, L, D) attend the text context (B, S, D); with a TextSwitch each token attends its own text
        (one query and output projection for both)."""
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))  # (B, L, N, Dh)
        if isinstance(context, TextSwitch):
            o = torch.where(context.second_tokens[..., None], self.attend(q, context.second),
                            self.attend(q, context.first))
        else:
            o = self.attend(q, context)
        return self.out(o, q)

    def attend(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attention output (B, L, N * Dh) of queries q (B, L, N, Dh) over the context (B, S, D)."""
        image_context = None
        if self.add_k_proj is not None:  # Wan I2V: [image tokens | 512 text tokens]
            n_img = context.shape[1] - WAN_TEXT_LEN
            image_context, context = context[:, :n_img], context[:, n_img:]
        k, v = self.context_kv(context)  # (B, S, N, Dh)
        o = _sdpa(q, k, v).flatten(2).type_as(q)  # (B, L, N * Dh)
        if image_context is not None:
            ki, vi = self.image_kv(image_context)
            o = o + _sdpa(q, ki, vi).flatten(2).type_as(q)
        return o


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# Transformer block: adaLN-modulated self-attention, cross-attention, FFN
# --------------------------------------------------------------------------------------------------------------------


class VideoDiTBlock(nn.Module):
    def __init__(
        self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool, eps: float, added_kv_proj_dim: int | None
    ):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = SelfAttention(dim, heads, eps)
        self.attn2 = CrossAttention(dim, heads, eps, added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """adaLN: shift, scale, gate (self-attention), shift, scale, gate (FFN), each (B, 1 or L, D) fp32."""
        if temb.ndim == 4:
            return (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)  # 6 x (B, L, D)
        return (self.scale_shift_table + temb.float()).chunk(6, dim=1)  # 6 x (B, 1, D)

    def modulated_input(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """What self-attention sees: norm1(x) * (1 + scale) + shift, fp32 (also TeaCache's change indicator)."""
        shift, scale = self.modulation(temb)[:2]
        return self.norm1(x.float()) * (1 + scale) + shift

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        context: torch.Tensor,  # (B, S, D)
        temb: torch.Tensor,  # (B, 6, D) or per token (B, L, 6, D)
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
    ) -> torch.Tensor:
        return self.forward_modulated(x, self.modulated_input(x, temb), context, temb, rope, ctx)

    def forward_modulated(
        self,
        x: torch.Tensor,  # (B, L, D)
        modulated: torch.Tensor,  # (B, L, D) fp32: modulated_input(x, temb)
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
    ) -> torch.Tensor:
        """The block from its self-attention input, for callers that computed `modulated_input` already (the step
        cache decides from it whether to run the block at all)."""
        _, _, gate_sa, shift_ff, scale_ff, gate_ff = self.modulation(temb)

        x = (x.float() + self.attn1(modulated.type_as(x), rope, ctx) * gate_sa).type_as(x)  # (B, L, D)

        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context)  # (B, L, D); with a TextSwitch each token attends its own text

        h = (self.norm3(x.float()) * (1 + scale_ff) + shift_ff).type_as(x)
        x = (x.float() + self.ffn(h).float() * gate_ff).type_as(x)  # (B, L, D)
        return x


# --------------------------------------------------------------------------------------------------------------------
# VideoDiT
# --------------------------------------------------------------------------------------------------------------------


class VideoDiT(DiffusersInterop, ModelMixin, ConfigMixin):
    """Wan2.1-architecture video DiT with a swappable self-attention backend.

    Attention is chosen by `model.set_attention(AttentionConfig(...))` (or a backend name), or per call with
    `attention_kwargs={"attention": cfg, "step": i, "stats": AttentionStats()}`. It is not part of the saved
    config, so checkpoints stay interchangeable with diffusers. Caches and sequence parallelism are hooks applied
    from outside (vdiff.cache, vdiff.parallel); blocks are called with keyword arguments, which hooks read by name.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["VideoDiTBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    # attention_kwargs a forward takes; `chunks` / `kv_cache` are for causal models (vdiff.models.causal)
    ATTENTION_KWARGS = ("attention", "step", "timestep", "stats", "mask_cache", "chunks", "kv_cache", "text_switch")

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        abs_pos_embed: bool = False,
        causal: dict | None = None,
    ) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.patch = tuple(patch_size)

        self.rope = RotaryPosEmbed3D(attention_head_dim, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # vdiff option (ModelConfig.abs_pos_embed; off = Wan): fixed absolute sin-cos table x learned per-channel gain
        # (1 at init: a zero gain gets almost no gradient, the layers after it never learn to read positions)
        self.pos_embed_gain = nn.Parameter(torch.ones(dim)) if abs_pos_embed else None
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, text_dim, image_dim, pos_embed_seq_len)
        self.blocks = nn.ModuleList(
            [
                VideoDiTBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps, added_kv_proj_dim)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

        self.gradient_checkpointing = False
        self.attention_config = AttentionConfig()
        # vdiff option (ModelConfig.causal; None = Wan): block-causal chunks for long video
        self.causal_config = CausalConfig(**causal) if causal is not None else None

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # Checkpoints saved before `text_pool` was removed carry `"text_pool": null`: the same model, load it quietly.
        config_dict = dict(config_dict)
        text_pool = config_dict.pop("text_pool", None)
        if text_pool is not None:
            raise ValueError(f"this checkpoint uses text_pool={text_pool!r}, an option vdiff no longer has (a "
                             "measured negative result, removed); load it with vdiff 0.1 or retrain without it")
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> VideoDiT:
        return cls(**config.to_vdiff())

    def set_attention(self, attention: AttentionConfig | str) -> None:
        """Choose the self-attention backend for later calls; raises now if it cannot run on this model's device."""
        if isinstance(attention, str):
            attention = AttentionConfig.named(attention)
        check_config(attention, self.device)
        self.attention_config = attention

    def token_grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (F, Hl, Wl) -> token grid (T, H, W)."""
        pt, ph, pw = self.patch
        f, h, w = latent_shape
        return f // pt, h // ph, w // pw

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C, F, Hl, Wl) latents
        timestep: torch.Tensor,  # (B,) or per token (B, L), in [0, 1000]
        encoder_hidden_states: torch.Tensor,  # (B, S, text_dim)
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        b, _, f, hl, wl = hidden_states.shape
        grid = self.token_grid((f, hl, wl))  # (T, H, W)
        ctx = self._attention_context(grid, attention_kwargs or {})

        x, rope = self.embed_tokens(hidden_states, grid)  # (B, L, D), ((L, 1, Dh/2) x 2), frame-major
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        temb, temb_proj, context, image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )  # temb (B[, L], D), temb_proj (B[, L], 6D), context (B, S, D)
        temb_proj = temb_proj.unflatten(-1, (6, -1))  # (B, 6, D) or (B, L, 6, D)
        if image is not None:
            context = torch.cat([image, context], dim=1)  # (B, S_img + S, D)
        switch = (attention_kwargs or {}).get("text_switch")  # (second text (B, S, text_dim), its tokens (B, L))
        if switch is not None:
            second = self.condition_embedder.text_embedder(switch[0].type_as(encoder_hidden_states))
            second = torch.cat([image, second], dim=1) if image is not None else second
            context = TextSwitch(context, second, switch[1].to(torch.bool))

        # Sparse backends want space-time neighbours in the same kernel block: reorder once, restore at the end.
        # A causal model attends chunk by chunk in frame-major order (each backend restricts its own pattern to the
        # chunks a query chunk sees, see vdiff.attention.blocksparse.attend_tail): no reorder.
        if self.causal_config is not None:
            if ctx.config.backend == "vmoba":
                raise ValueError(VMOBA_CAUSAL)
            ctx.causal = layout_for(self.causal_config, grid, self.patch[0], self.rope, ctx.causal)
            perm = None
        else:
            perm = token_order(ctx.config, grid, x.device, ctx.mask_cache)  # (L,) or None
        if perm is not None:
            x, rope = x[:, perm], (rope[0][perm], rope[1][perm])
            if temb.ndim == 3:
                temb, temb_proj = temb[:, perm], temb_proj[:, perm]
            if isinstance(context, TextSwitch):
                context = dataclasses.replace(context, second_tokens=context.second_tokens[:, perm])

        for i, block in enumerate(self.blocks):
            run = functools.partial(block, context=context, temb=temb_proj, rope=rope, ctx=ctx.for_layer(i))
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(run, x)  # (B, L, D)
            else:
                x = run(x)  # (B, L, D)

        x = self.output_head(x, temb)  # (B, L, pt*ph*pw*C_out)
        if perm is not None:
            x = x[:, torch.argsort(perm)]  # back to frame-major
        out = self.unpatchify(x, grid)  # (B, C_out, F, Hl, Wl)

        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def embed_tokens(self, latents: torch.Tensor, grid: tuple[int, int, int]):
        """Latents (B, C, F, Hl, Wl) -> tokens (B, L, D) frame-major, and their RoPE tables (cos, sin)."""
        cos, sin = self.rope(grid)  # (L, 1, Dh/2) each, frame-major
        x = self.patch_embedding(latents)  # (B, D, T, H, W)
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
        if self.pos_embed_gain is not None:
            t, h, w = grid
            if self.causal_config is not None:  # time within the chunk: the same table whatever chunk a forward holds
                frames = self.causal_config.chunk_frames // self.patch[0]
                table = absolute_position_table((frames, h, w), x.shape[-1], x.device).repeat(t // frames, 1)
            else:
                table = absolute_position_table(grid, x.shape[-1], x.device)  # (L, D), frame-major
            x = x + (table * self.pos_embed_gain.float()).to(x.dtype)
        return x, (cos, sin)

    def output_head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """adaLN-modulated final norm and projection: (B, L, D) -> (B, L, pt*ph*pw*C_out).

        Under sequence parallel the blocks ran on a shard of the tokens; vdiff.parallel's hook on `norm_out`
        gathers them, so this head always sees every token."""
        if temb.ndim == 3:  # per-token timesteps
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)  # (B, L, D)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Frame-major patch outputs (B, L, pt*ph*pw*C_out) -> latents (B, C_out, F, Hl, Wl)."""
        pt, ph, pw = self.patch
        t, h, w = grid
        x = x.reshape(x.shape[0], t, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _attention_context(self, grid, kwargs: dict[str, Any]) -> AttentionContext:
        if "sequence_parallel" in kwargs:
            raise TypeError("VideoDiT: sequence parallel is applied from outside the model, "
                            "vdiff.parallel.apply_sequence_parallel(model, sp), not through attention_kwargs")
        unknown = set(kwargs) - set(self.ATTENTION_KWARGS)
        if unknown:
            raise TypeError(
                f"VideoDiT: unknown attention_kwargs {sorted(unknown)}; known: {sorted(self.ATTENTION_KWARGS)}"
            )
        config = kwargs.get("attention") or self.attention_config
        if isinstance(config, str):
            config = AttentionConfig.named(config)
        elif isinstance(config, dict):
            from vdiff.config import from_dict

            config = from_dict(AttentionConfig, config, prefix="attention.")
        if self.causal_config is None and (kwargs.get("chunks") is not None or kwargs.get("kv_cache") is not None):
            raise TypeError("VideoDiT: attention_kwargs 'chunks' / 'kv_cache' are for causal models (model.causal)")
        return AttentionContext(
            grid=grid,
            config=config,
            step=kwargs.get("step"),
            timestep=kwargs.get("timestep"),
            mask_cache=kwargs.get("mask_cache") or MaskCache(),  # no mask cache given: one for this forward only
            stats=kwargs.get("stats"),
            causal=kwargs.get("chunks"),  # the entries; the forward turns them into a CausalLayout
            kv_cache=kwargs.get("kv_cache"),
        )


def model_config_of(model: VideoDiT) -> ModelConfig:
    """The typed ModelConfig of a built model."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in model.config.items() if k in names}
    values["patch_size"] = tuple(values["patch_size"])
    return ModelConfig(**values)
