"""The original Wan2.1 checkpoint layout (one `.safetensors` as the Wan repository writes it) <-> diffusers' names.

    state = original_to_diffusers(load_file("Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors"))
    config = config_from_original(state_in_original_names)      # shapes -> VideoDiT config (head dim 128 as Wan2.1)

Original names (wan/modules/model.py) and diffusers' differ per module; parameters keep their `.weight` / `.bias`
suffix. Wan's cross-attention norm is `norm3` (its norm1 / norm2 have no weights), diffusers' is `norm2`. A key this
table does not know is an error, never dropped: a silently missing tensor would stay at its random initialisation.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

# original module path -> diffusers module path, outside the blocks
TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
# the same inside `blocks.N.`
BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # what ComfyUI-style exports put in front
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SUFFIXES = (".weight", ".bias")
WAN_HEAD_DIM = 128  # every Wan2.1 model (1.3B: 1536 = 12 x 128, 14B: 5120 = 40 x 128)


def _rename(key: str, top: dict[str, str], block: dict[str, str], direction: str) -> str:
    match = _BLOCK_KEY.match(key)
    table, head, rest = (block, f"blocks.{match.group(1)}.", match.group(2)) if match else (top, "", key)
    module, suffix = rest, ""
    for s in _SUFFIXES:
        if rest.endswith(s):
            module, suffix = rest[: -len(s)], s
    if module not in table:
        raise KeyError(f"{direction}: unknown Wan2.1 transformer key {key!r}")
    return head + table[module] + suffix


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan2.1 key names -> diffusers' (= VideoDiT's). Prefixes such as `model.diffusion_model.` go."""
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[_rename(key, TOP, BLOCK, "original -> diffusers")] = value
    return out


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' key names -> the original Wan2.1 layout (what the Wan repository and ComfyUI load)."""
    top = {v: k for k, v in TOP.items()}
    block = {v: k for k, v in BLOCK.items()}
    return {_rename(key, top, block, "diffusers -> original"): value for key, value in state.items()}


def config_from_original(state: dict[str, torch.Tensor], **overrides: Any) -> dict[str, Any]:
    """VideoDiT config fields read off a state dict in diffusers' names (converted from the original layout).

    Shapes give everything but the head count, which is hidden size / 128 as in every Wan2.1 model unless
    `num_attention_heads` (or `attention_head_dim`) is given in `overrides`."""
    patch = state["patch_embedding.weight"]  # (D, C_in, pt, ph, pw)
    dim = patch.shape[0]
    num_layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    config: dict[str, Any] = dict(
        patch_size=tuple(patch.shape[2:]),
        in_channels=patch.shape[1],
        out_channels=state["proj_out.weight"].shape[0] // math.prod(patch.shape[2:]),
        text_dim=state["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        freq_dim=state["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        ffn_dim=state["blocks.0.ffn.net.0.proj.weight"].shape[0],
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm2.weight" in state,
    )
    if "condition_embedder.image_embedder.norm1.weight" in state:
        config["image_dim"] = state["condition_embedder.image_embedder.norm1.weight"].shape[0]
    if "blocks.0.attn2.add_k_proj.weight" in state:
        config["added_kv_proj_dim"] = state["blocks.0.attn2.add_k_proj.weight"].shape[1]
    if "condition_embedder.image_embedder.pos_embed" in state:
        config["pos_embed_seq_len"] = state["condition_embedder.image_embedder.pos_embed"].shape[1]
    config.update(overrides)
    if "num_attention_heads" in overrides and "attention_head_dim" not in overrides:
        config["attention_head_dim"] = dim // config["num_attention_heads"]
    config.setdefault("attention_head_dim", WAN_HEAD_DIM)
    config.setdefault("num_attention_heads", dim // config["attention_head_dim"])
    if config["num_attention_heads"] * config["attention_head_dim"] != dim:
        raise ValueError(f"hidden size {dim} is not num_attention_heads x attention_head_dim = "
                         f"{config['num_attention_heads']} x {config['attention_head_dim']}; pass the right ones")
    return config


def read_original(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an original-layout checkpoint (`.safetensors`, or a `.pt`/`.pth` state dict), in diffusers'
    names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"single-file checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return original_to_diffusers(state)
