"""Training recipes: typed dataclasses; `configs/train/*.yaml` and `key=value` overrides only change fields.

    recipe = load_recipe("configs/train/tiny.yaml", ["train.max_steps=10", "model.attention.backend=radial"])

Sections: `output_dir`, `model` (a preset + ModelConfig field changes + `attention`), `text_encoder`, `vae`, `data`,
`flow` (timestep sampling), `optim`, `train` (loop, precision, distributed, checkpoints), `validation`.
An unknown key or a wrong type raises `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vdiff.config import AttentionConfig, CausalConfig, ConfigError, ModelConfig, load_config, model_preset
from vdiff.diffusion.flow import FlowConfig
from vdiff.lora import LoraConfig

DEEPSPEED_PRESETS = ("none", "zero2", "zero3", "zero2_offload", "zero3_offload")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelSection:
    """`model:` in a recipe: a named preset, then any ModelConfig field changed (None = the preset's value), and
    the self-attention backend used in training."""

    preset: str = "tiny"
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    patch_size: tuple[int, int, int] | None = None
    num_attention_heads: int | None = None
    attention_head_dim: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    text_dim: int | None = None
    freq_dim: int | None = None
    ffn_dim: int | None = None
    num_layers: int | None = None
    cross_attn_norm: bool | None = None
    qk_norm: str | None = None
    eps: float | None = None
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int | None = None
    pos_embed_seq_len: int | None = None
    abs_pos_embed: bool | None = None
    causal: CausalConfig | None = None  # long video: block-causal chunks (None = bidirectional)

    def __post_init__(self) -> None:
        self.to_model_config()  # a bad preset or field fails at load time, naming the key

    def to_model_config(self) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name in names and getattr(self, f.name) is not None}
        try:
            return model_preset(self.preset, **changes)
        except ConfigError as err:
            raise ConfigError(str(err) if str(err).startswith("model.") else f"model.{err}") from None


@dataclass
class DataConfig:
    """`dataset`: shapes (ShapesWorld, generated) | video_folder (`root`: videos + captions). `latent_cache`: a folder
    where latents + text embeddings are precomputed once and read back on every later epoch and run."""

    dataset: Literal["shapes", "video_folder"] = "shapes"
    num_samples: int = 256  # shapes
    split: str = "train"  # shapes: train | heldout | all
    seed: int = 0
    num_frames: int = 8
    height: int = 16
    width: int = 16
    position_jitter: float = 1.0  # shapes: fraction of the allowed start range used (0 = one centred path per caption)
    boundary: Literal["stop", "wrap"] = "stop"  # shapes: wrap = the object wraps around the frame (long video)
    switch_prob: float = 0.0  # shapes, wrap: share of clips that turn once, at a multiple of `switch_every` frames
    switch_every: int = 1  # (a causal model's frames per chunk: turns at chunk boundaries, one caption per segment)
    motion_jitter: float | None = None  # shapes, wrap: start spread along the motion axis (None: position_jitter)
    turn: str = "carry"  # shapes, switches: a new segment's first frame placed by the old motion (carry) or its own
    root: str | None = None  # video_folder
    frame_stride: int = 1  # video_folder: take every k-th frame
    latent_cache: str | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_frames", "height", "width", "frame_stride", "switch_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.position_jitter <= 1.0:
            raise ConfigError(f"data.position_jitter must be in [0, 1], got {self.position_jitter}")
        if self.motion_jitter is not None and (self.boundary != "wrap" or not 0.0 <= self.motion_jitter <= 1.0):
            raise ConfigError(f"data.motion_jitter must be in [0, 1] and needs data.boundary=wrap, got "
                              f"{self.motion_jitter} with boundary={self.boundary}")
        if not 0.0 <= self.switch_prob <= 1.0:
            raise ConfigError(f"data.switch_prob must be in [0, 1], got {self.switch_prob}")
        if self.switch_prob > 0 and (self.boundary != "wrap" or self.num_frames % self.switch_every):
            raise ConfigError(f"data.switch_prob > 0 needs data.boundary=wrap and data.num_frames "
                              f"({self.num_frames}) a multiple of data.switch_every ({self.switch_every})")
        from vdiff.data.shapes import TURNS

        if self.turn not in TURNS:
            raise ConfigError(f"data.turn must be 'carry' or 'crisp', got {self.turn!r}")
        if self.dataset == "video_folder" and not self.root:
            raise ConfigError("data.root is required when data.dataset=video_folder")

    def shapes_world(self):
        """The ShapesWorld dataset these settings describe (the trainer's and `python -m train cache`'s)."""
        from vdiff.data.shapes import ShapesWorld

        return ShapesWorld(self.num_samples, num_frames=self.num_frames, height=self.height, width=self.width,
                           seed=self.seed, split=self.split, position_jitter=self.position_jitter,
                           boundary=self.boundary, switch_prob=self.switch_prob, switch_every=self.switch_every,
                           motion_jitter=self.motion_jitter, turn=self.turn)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # cosine / linear decay to lr * min_lr_ratio at max_steps

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """The loop. `batch_size` is per process and micro-batch; the global batch is
    batch_size * grad_accum * (processes / sequence_parallel)."""

    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 = off
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    ema_decay: float = 0.999  # 0 = the exported weights are the latest ones
    cfg_dropout: float = 0.1  # probability that a caption is replaced by "" (classifier-free guidance)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str | None = None  # latest | a checkpoint folder
    # start from these weights instead of random ones (fine-tuning): a pipeline folder (its transformer/), a
    # transformer folder or a .safetensors file. A resumed run restores its own checkpoint instead.
    init_from: str | None = None
    deepspeed: str = "none"  # none | zero2 | zero3 | zero2_offload | zero3_offload | path/to/ds_config.json
    sequence_parallel: int = 1  # Ulysses group size; must divide the number of processes and the head count
    log_every: int = 1
    export: bool = True  # write output_dir/pipeline at the end
    # flow | teacher_forcing | diffusion_forcing (the last two: causal models, train/objectives.py)
    objective: Literal["flow", "teacher_forcing", "diffusion_forcing"] = "flow"
    context_noise: float = 0.0  # causal models: noise level of the context chunks (the sampler uses the same)
    # teacher forcing: loss weight of the first noisy chunk (it has no context) and of the first chunk after a
    # turn (data.switch_prob); every other chunk weighs 1, the mean stays over all chunks
    first_chunk_weight: float = 1.0
    switch_weight: float = 1.0
    # train LoRA adapters only (PEFT; the model's own weights frozen): {rank, alpha, target_modules, dropout}.
    # None = train every weight. The export holds the base transformer + pytorch_lora_weights.safetensors.
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                     "sequence_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.cfg_dropout <= 1:
            raise ConfigError(f"train.cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        for name in ("first_chunk_weight", "switch_weight"):
            if not 0.0 < getattr(self, name) <= 100.0:
                raise ConfigError(f"train.{name} must be in (0, 100], got {getattr(self, name)}")
        if self.deepspeed not in DEEPSPEED_PRESETS and not self.deepspeed.endswith(".json"):
            raise ConfigError(f"train.deepspeed must be one of {list(DEEPSPEED_PRESETS)} or a .json file, "
                              f"got {self.deepspeed!r}")


@dataclass
class ValidationConfig:
    """Samples from the EMA weights every `every` steps (0 = only at the end, if `at_end`), one mp4 per prompt."""

    every: int = 0
    at_end: bool = True
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right"])
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    sampler: Literal["unipc", "euler"] = "unipc"
    shift: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"validation.every must be >= 0, got {self.every}")


@dataclass
class TrainRecipe:
    output_dir: str = "runs/tiny"
    model: ModelSection = field(default_factory=ModelSection)
    text_encoder: str = "minilm"  # minilm (packaged) | a local transformers encoder folder (T5/UMT5 for Wan)
    text_max_length: int = 32
    vae: str = "pixel"  # pixel (PixelPatchVAE matching model.in_channels) | a local AutoencoderKLWan folder
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.train.objective != "flow" and self.model.to_model_config().causal is None:
            raise ConfigError(f"train.objective={self.train.objective} trains a causal model: set model.causal "
                              "(chunk_frames, sink_chunks, window_chunks, rope)")
        if not 0.0 <= self.train.context_noise < 1.0:
            raise ConfigError(f"train.context_noise must be in [0, 1), got {self.train.context_noise}")
        weighted = [n for n in ("first_chunk_weight", "switch_weight") if getattr(self.train, n) != 1.0]
        if weighted and self.train.objective != "teacher_forcing":
            raise ConfigError(f"train.{weighted[0]} weighs teacher-forcing chunks: set "
                              f"train.objective=teacher_forcing (got {self.train.objective})")


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainRecipe:
    """Defaults, then the YAML recipe at `path`, then dotted `key=value` overrides."""
    return load_config(TrainRecipe, path, overrides)


def deepspeed_config_path(name: str) -> Path:
    """configs/deepspeed/<name>.json for a preset name, or the given .json path."""
    path = Path(name) if name.endswith(".json") else CONFIGS / "deepspeed" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: config file not found: {path}")
    return path
