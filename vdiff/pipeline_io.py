"""A pipeline's files: its config (`PipelineConfig`), its scheduler, writing the folder atomically, writing videos.

    data = read_config(folder)            # vdiff.json, vdiff.yaml, or Wan's defaults for a diffusers Wan folder
    scheduler = load_scheduler(folder / "scheduler")
    with atomic_folder(folder) as tmp:    # write everything into tmp; it replaces `folder` only if all of it worked
        ...
    write_video("clip.mp4", frames, fps=8)

Kept apart from `VideoPipeline` so that the rules of the folder layout (which file wins, what a Wan folder implies,
how a half-written save never replaces a good one) are read in one place.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdiff.cache import CACHE_NAMES
from vdiff.config import AttentionConfig, ConfigError
from vdiff.diffusion.sampling import sampler_name

CONFIG_NAME = "vdiff.json"
YAML_CONFIG_NAME = "vdiff.yaml"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
VIDEO_FORMATS = (".mp4", ".gif", ".webm")

@dataclass
class PipelineConfig:
    """Defaults of a pipeline (saved as vdiff.json). Every call argument left as None takes the value here."""

    num_frames: int = 16
    height: int = 32
    width: int = 32
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    fps: int = 8
    text_encoder: str = "minilm"  # "minilm" (packaged all-MiniLM-L6-v2) or a subfolder with a transformers encoder
    tokenizer: str | None = None  # subfolder of the tokenizer when it is not inside the text encoder's (Wan: tokenizer)
    text_max_length: int = 32
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    cache: list[str] = field(default_factory=lambda: ["text_kv", "mask", "prompt"])  # exact caches on by default
    max_num_frames: int | None = None  # optional caps below what the model can do (e.g. for a public server)
    max_height: int | None = None
    max_width: int | None = None
    lora: str | None = None  # LoRA file in the folder (pytorch_lora_weights.safetensors) that from_pretrained loads
    lora_scale: float = 1.0
    context_noise: float = 0.0  # causal models: noise level of the history chunks attend to (as in training)
    # causal models, at a prompt switch: for the next `switch_guidance_chunks` chunks the velocity is pushed away from
    # the old prompt's, v_old + g (v_new - v_old) (vdiff.streaming); 1 = off
    switch_guidance: float = 1.0
    switch_guidance_chunks: int = 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.context_noise < 1.0:
            raise ConfigError(f"context_noise must be in [0, 1), got {self.context_noise!r}")
        check_switch_guidance(self.switch_guidance, self.switch_guidance_chunks, ConfigError)
        for name in self.cache:
            if name not in CACHE_NAMES:
                raise ConfigError(f"cache: unknown cache {name!r}; known: {list(CACHE_NAMES)}")


def check_switch_guidance(scale: Any, chunks: Any, error: type[Exception] = ValueError) -> None:
    """`error` naming the argument for a switch guidance scale outside [1, 20] or a chunk count outside [1, 1000]."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= 20.0:
        raise error(f"switch_guidance must be a number in [1, 20] (1 = off), got {scale!r}")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= 1000:
        raise error(f"switch_guidance_chunks must be an int in [1, 1000], got {chunks!r}")


# What a Wan2.1 diffusers folder (model_index.json, no vdiff.json) implies: Wan's own sampling recipe and UMT5.
WAN_DEFAULTS = dict(num_frames=81, height=480, width=832, num_inference_steps=50, guidance_scale=5.0, fps=16,
                    text_encoder="text_encoder", tokenizer="tokenizer", text_max_length=512)


# --------------------------------------------------------------------------------------------------------------------
# Config and scheduler
# --------------------------------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """The PipelineConfig fields stored in a pipeline folder (vdiff.json first, then vdiff.yaml, then a Wan folder)."""
    if (path / CONFIG_NAME).is_file():
        return json.loads((path / CONFIG_NAME).read_text())
    if (path / YAML_CONFIG_NAME).is_file():
        from vdiff.config import load_yaml

        return load_yaml(path / YAML_CONFIG_NAME)
    if (path / "model_index.json").is_file():  # a diffusers (Wan2.1) pipeline folder
        index = json.loads((path / "model_index.json").read_text())
        if not str(index.get("_class_name", "")).startswith("Wan"):
            raise ValueError(f"{path}: diffusers pipeline {index.get('_class_name')!r} is not a Wan pipeline")
        return dict(WAN_DEFAULTS)
    raise FileNotFoundError(f"{path}: no {CONFIG_NAME}, {YAML_CONFIG_NAME} or model_index.json")


def is_pipeline_folder(path: Path) -> bool:
    """Whether `path` holds a config `read_config` reads (a folder worth handing to `VideoPipeline.from_pretrained`)."""
    return any((path / name).is_file() for name in (CONFIG_NAME, YAML_CONFIG_NAME, "model_index.json"))


def write_config(path: Path, data: dict[str, Any]) -> None:
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")


def load_scheduler(path: Path) -> Any:
    """The diffusers scheduler saved in `path`. A folder without one is an error: guessing a sampler would give
    other videos than the ones the model was exported (and evaluated) with."""
    file = path / SCHEDULER_CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a pipeline folder needs its scheduler config "
                                f"(scheduler/{SCHEDULER_CONFIG_NAME}, written by save_pretrained)")
    import diffusers

    name = json.loads(file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ValueError(f"{file}: unknown scheduler class {name!r}")
    scheduler = cls.from_pretrained(path)
    sampler_name(scheduler)  # a flow-matching scheduler we can drive, or a clear error
    return scheduler


# --------------------------------------------------------------------------------------------------------------------
# Atomic folder writes
# --------------------------------------------------------------------------------------------------------------------


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it takes `path`'s place (an old folder there is
    moved aside first and deleted after), on failure it is deleted and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --------------------------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------------------------


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3)."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, T, H, W)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """uint8 (T, H, W, 3) -> .mp4 (H.264), .webm (VP9) or .gif."""
    import imageio.v2 as imageio

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_FORMATS:
        raise ValueError(f"out: unsupported video format {ext!r}; use one of {list(VIDEO_FORMATS)}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".gif":
        imageio.mimwrite(path, list(frames), format="GIF", duration=1000 / fps, loop=0)
    else:
        codec = "libx264" if ext == ".mp4" else "libvpx-vp9"
        quality = ["-crf", "18"] if ext == ".mp4" else ["-b:v", "0", "-crf", "30"]
        imageio.mimwrite(path, list(frames), fps=fps, codec=codec, macro_block_size=1, quality=None,
                         pixelformat="yuv420p", output_params=quality)
    return path
