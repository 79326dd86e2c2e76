"""Processes, devices and sharding for training: the one module that knows about Accelerate, DeepSpeed, FSDP and
sequence parallelism. The rest of the trainer asks it questions (which rank reads which data, how to see whole
parameters, what the gradient norm was) and never tests for a backend itself.

Why the pieces look as they do:
- Accelerate is built from the recipe alone (no `accelerate config` file), so a run is reproducible from its recipe;
- on CPU under DeepSpeed, Accelerate needs gloo named explicitly or it counts one process while torch.distributed
  has N; the process count is checked against torch.distributed, since a mismatch silently breaks data sharding;
- data-parallel rank and world come from the sequence-parallel grouping, not from Accelerate: ranks of one
  sequence-parallel group read the same samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.config import TrainConfig, deepspeed_config_path
from vdiff.config import ConfigError
from vdiff.parallel import sequence_parallel_groups


def resolve_precision(requested: str) -> str:
    """train.mixed_precision: `auto` is bf16 on a GPU and fp32 ("no") on CPU; bf16 on CPU is refused."""
    on_gpu = torch.cuda.is_available()
    precision = requested if requested != "auto" else ("bf16" if on_gpu else "no")
    if precision == "bf16" and not on_gpu:
        raise ConfigError("train.mixed_precision=bf16 needs a GPU; CPU runs train in fp32 (use auto or no)")
    return precision


def deepspeed_config(train: TrainConfig, precision: str, world: int) -> dict[str, Any]:
    """The DeepSpeed preset (configs/deepspeed/*.json) with batch sizes, clipping and precision taken from the recipe,
    so the JSON files only choose the ZeRO stage and offloading."""
    ds = json.loads(deepspeed_config_path(train.deepspeed).read_text())
    ds.update(train_micro_batch_size_per_gpu=train.batch_size, gradient_accumulation_steps=train.grad_accum,
              train_batch_size=train.batch_size * train.grad_accum * world, gradient_clipping=train.grad_clip)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds.pop("fp16", None)
    return ds


def build_accelerator(train: TrainConfig, project_dir: str | Path):
    """An `accelerate.Accelerator` for this recipe: plain (1 process), DDP (NCCL, or gloo on CPU) under torchrun, or
    with a DeepSpeed plugin (train.deepspeed). FSDP is Accelerate's own, switched on by its environment
    (ACCELERATE_USE_FSDP); nothing here adds to it."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(train.mixed_precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = dict(
        gradient_accumulation_steps=train.grad_accum, mixed_precision=precision,
        project_config=ProjectConfiguration(project_dir=str(project_dir)),
    )
    if train.deepspeed != "none":
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(train, precision, world))
        if not on_gpu:
            # Without a GPU, Accelerate leaves its backend unset under DeepSpeed and reports 1 process while
            # torch.distributed has N; naming gloo makes it see every rank.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            # DeepSpeed would JIT-compile (minutes of g++) a shared-memory all-reduce for CPU; gloo suffices.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    elif not on_gpu:
        kwargs["cpu"] = True  # MULTI_CPU over gloo under torchrun
    acc = Accelerator(**kwargs)
    real_world = dist.get_world_size() if dist.is_initialized() else 1
    if acc.num_processes != real_world:
        raise RuntimeError(f"Accelerate sees {acc.num_processes} processes but torch.distributed has {real_world}")
    return acc


@dataclass
class Distributed:
    """This process's place in the run: the accelerator, its sequence-parallel group (None when
    train.sequence_parallel=1) and its data-parallel coordinates."""

    accelerator: Any
    sequence_parallel: Any
    dp_rank: int
    dp_world: int

    @classmethod
    def setup(cls, train: TrainConfig, project_dir: str | Path) -> Distributed:
        acc = build_accelerator(train, project_dir)
        # Every rank creates every group right after the process group exists, before any other collective.
        sp, dp_rank, dp_world = sequence_parallel_groups(train.sequence_parallel)
        return cls(acc, sp, dp_rank, dp_world)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    @property
    def zero3(self) -> bool:
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3

    @contextmanager
    def whole_encoders(self) -> Iterator[None]:
        """Load frozen encoders inside this: transformers shards any model it builds while a ZeRO-3 config is
        registered with it, and the text encoder must stay whole on every rank. The registration is restored after,
        because Accelerate's prepare() relies on it."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    @contextmanager
    def full_parameters(self, model: torch.nn.Module) -> Iterator[list[torch.nn.Parameter]]:
        """The unwrapped model's parameters, whole on every rank for the duration (gathered under ZeRO-3, where each
        rank holds only a shard; read-only: changes are not scattered back)."""
        params = list(self.accelerator.unwrap_model(model).parameters())
        if not self.zero3:
            yield params
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield params

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float | torch.Tensor:
        """Clip to `max_norm` (0 = off) and return the global gradient norm before clipping. Call right after the
        backward of the micro-batch that syncs gradients. DeepSpeed has by then clipped inside its own step (the
        limit is in its config) and reports the norm it saw; everything else clips here, through Accelerate, which
        knows how to reduce a norm over DDP or FSDP shards."""
        if self.deepspeed:
            return model.get_global_grad_norm()
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
