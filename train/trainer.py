"""The training loop: flow matching for VideoDiT on Accelerate (+ DeepSpeed ZeRO or FSDP), 1 CPU process to N GPUs
on M nodes. Distributed setup lives in `_build_accelerator` and nowhere else; `run` only does forward/backward/step,
EMA, logging, checkpoints and validation samples. A new objective overrides `compute_loss`.

Exactness (a run killed and resumed logs the same losses as one that was not):
- every sample's noise, noise level and caption dropout come from a generator seeded by (seed, step, sample index),
  never from a global RNG stream, so they do not depend on the process count, the batch split or a resume;
- the data order is a pure function of (seed, epoch) and the sampler starts at the restored step, sharded here by
  data-parallel rank (not by `accelerator.prepare`, see ENVIRONMENT.md: under DeepSpeed on CPU it did not shard);
- `accelerator.save_state` stores model, optimizer, LR schedule, EMA, progress and RNG; checkpoints are written to a
  temporary folder and renamed, so a kill mid-write leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from train.config import TrainRecipe, deepspeed_config_path
from vdiff.config import ConfigError, to_dict
from vdiff.diffusion.flow import add_noise, flow_loss, sample_sigmas, timesteps_of
from vdiff.models.dit import VideoDiT
from vdiff.parallel import sequence_parallel_groups

logger = logging.getLogger("vdiff.train")

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# Test hook: SIGKILL the run after writing checkpoint N's files but before publishing it (atomicity check).
KILL_IN_CHECKPOINT_ENV = "VDIFF_TEST_KILL_IN_CHECKPOINT"
# Verification hook: every rank writes the sample indices it read and a hash of its full parameters here.
DEBUG_DIR_ENV = "VDIFF_TRAIN_DEBUG_DIR"


# --------------------------------------------------------------------------------------------------------------------
# Initial weights (train.init_from): fine-tuning starts from a saved transformer
# --------------------------------------------------------------------------------------------------------------------


# vdiff's own additions to Wan's VideoDiT (no Wan checkpoint has them): allowed to be missing from initial weights,
# they keep their fresh initialisation
# (a key, or a module prefix ending in ".")
OPTIONAL_KEYS = ("pos_embed_gain", "condition_embedder.text_pool.")


def _optional(key: str) -> bool:
    return any(key == o or (o.endswith(".") and key.startswith(o)) for o in OPTIONAL_KEYS)


def load_initial_weights(model: VideoDiT, source: str | Path) -> None:
    """`train.init_from`: copy weights into a freshly built model. Every key must match in name and shape, except
    vdiff's own additions (OPTIONAL_KEYS: e.g. a Wan checkpoint fine-tuned with abs_pos_embed=true or text_pool), which keep their
    fresh initialisation."""
    from safetensors.torch import load_file

    path = Path(source)
    for candidate in (path / "transformer" / "diffusion_pytorch_model.safetensors",
                      path / "diffusion_pytorch_model.safetensors", path):
        if candidate.is_file():
            break
    else:
        raise FileNotFoundError(f"train.init_from: no transformer weights at {source} (a pipeline folder, a "
                                "transformer folder or a .safetensors file)")
    state = load_file(str(candidate))
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not _optional(k))
    if wrong or unexpected or missing:
        raise ValueError(f"train.init_from={source}: weights do not fit this model config: shape mismatches {wrong[:5]}, "
                         f"unexpected keys {unexpected[:5]}, missing keys {missing[:5]}")
    model.load_state_dict(state, strict=False)
    logger.info("initial weights from %s (%d tensors)", candidate, len(state))


# --------------------------------------------------------------------------------------------------------------------
# Data order: deterministic, sharded by data-parallel rank, resumable at any step
# --------------------------------------------------------------------------------------------------------------------


class ShardedBatchSampler:
    """Endless micro-batches of indices. Epoch e is a permutation of seed+e; micro-batch j of the run takes slice
    (j % per_epoch) * dp_world + dp_rank of that permutation, so data-parallel ranks read disjoint samples and the
    union over ranks of micro-batch j is the same global batch whatever the rank count. `start` skips j < start."""

    def __init__(self, num_items: int, batch_size: int, dp_rank: int, dp_world: int, seed: int, start: int = 0):
        self.num_items, self.batch_size, self.dp_rank, self.dp_world = num_items, batch_size, dp_rank, dp_world
        self.seed, self.start = seed, start
        self.per_epoch = num_items // (batch_size * dp_world)
        if self.per_epoch < 1:
            raise ConfigError(f"data: {num_items} samples cannot fill one global micro-batch of "
                              f"train.batch_size={batch_size} x {dp_world} data-parallel ranks")

    def indices(self, j: int) -> list[int]:
        epoch, k = divmod(j, self.per_epoch)
        perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        offset = (k * self.dp_world + self.dp_rank) * self.batch_size
        return perm[offset:offset + self.batch_size].tolist()

    def __iter__(self):
        j = self.start
        while True:
            yield self.indices(j)
            j += 1


def collate(items: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one sample's noise at one step: independent of ranks, batch split and resume."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Progress:
    """What the loop has done (saved with every checkpoint)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warm-up, then constant / cosine / linear decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------



def latent_cache_fingerprint(recipe: TrainRecipe, in_channels: int) -> dict:
    """What a latent cache was built from (dataset, VAE, text encoder): a cache with another fingerprint is refused.

    `data.position_jitter` came after the first caches; at its default (1) it is left out, so they stay valid."""
    data_key = to_dict(recipe.data) | {"latent_cache": None, "num_workers": None}
    if recipe.data.position_jitter == 1.0:
        del data_key["position_jitter"]
    return {"data": data_key, "vae": recipe.vae, "in_channels": in_channels,
            "text_encoder": recipe.text_encoder, "text_max_length": recipe.text_max_length}

class Trainer:
    def __init__(self, recipe: TrainRecipe):
        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        r = recipe.train
        self.accelerator = self._build_accelerator()
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
        self.sp, self.dp_rank, self.dp_world = sequence_parallel_groups(r.sequence_parallel)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=2) + "\n")

        # Model: identical initial weights on every rank (seeded), EMA copy made before any sharding.
        self.model_config = recipe.model.to_model_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r.seed)
            model = VideoDiT.from_model_config(self.model_config)
        if r.init_from:
            load_initial_weights(model, r.init_from)
        model.to(self.device)
        model.set_attention(recipe.model.attention)  # raises now if the backend cannot run (or train) here
        if r.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        plugin = acc.state.deepspeed_plugin
        if plugin is not None:  # frozen encoders stay whole on every rank (transformers would shard them under ZeRO-3)
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        try:
            self.text_encoder, self.vae = self._build_encoders()
        finally:
            if plugin is not None:
                plugin.set_deepspeed_weakref()
        self.dataset = self._build_dataset()
        self.tokens_per_sample = math.prod(model.token_grid(self.vae.latent_shape(
            recipe.data.num_frames, recipe.data.height, recipe.data.width)))

        o = recipe.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        # Stepped here once per optimizer step (not via prepare(): Accelerate would step it once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, o.warmup_steps, r.max_steps, o.schedule, o.min_lr_ratio))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.progress = Progress()
        acc.register_for_checkpointing(self.scheduler, self.ema, self.progress)
        self.empty_text = self._encode_text([""])  # (1, S, dim): the unconditional caption for CFG dropout
        self.writer = None

    # ---------------------------------------------------------------------------------------------------------------
    # Setup: the one place that knows about processes, devices, DeepSpeed, precision
    # ---------------------------------------------------------------------------------------------------------------

    def _build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

        r = self.recipe.train
        on_gpu = torch.cuda.is_available()
        precision = r.mixed_precision if r.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
        if precision == "bf16" and not on_gpu:
            raise ConfigError("train.mixed_precision=bf16 needs a GPU; CPU runs train in fp32 (use auto or no)")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        kwargs: dict[str, Any] = dict(
            gradient_accumulation_steps=r.grad_accum, mixed_precision=precision,
            project_config=ProjectConfiguration(project_dir=str(self.out)),
        )
        if r.deepspeed != "none":
            ds = json.loads(deepspeed_config_path(r.deepspeed).read_text())
            ds.update(train_micro_batch_size_per_gpu=r.batch_size, gradient_accumulation_steps=r.grad_accum,
                      train_batch_size=r.batch_size * r.grad_accum * world, gradient_clipping=r.grad_clip)
            ds["bf16"] = {"enabled": precision == "bf16"}
            ds.pop("fp16", None)
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
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

    def _build_encoders(self):
        from vdiff.models.text import HFTextEncoder, minilm_text_encoder
        from vdiff.models.vae import PixelPatchVAE, load_vae

        rc = self.recipe
        if rc.text_encoder == "minilm":
            text = minilm_text_encoder(rc.text_max_length)
        else:
            text = HFTextEncoder.from_pretrained(rc.text_encoder, rc.text_max_length)
        text.to(self.device)
        if rc.vae == "pixel":
            try:
                vae = PixelPatchVAE.for_channels(self.model_config.in_channels)
            except ValueError:
                raise ConfigError(f"vae=pixel needs model.in_channels = 3*k*k (got {self.model_config.in_channels})") \
                    from None
        else:
            vae = load_vae(rc.vae).to(self.device)
        if vae.latent_channels != self.model_config.in_channels:
            raise ConfigError(f"vae has {vae.latent_channels} latent channels, model.in_channels="
                              f"{self.model_config.in_channels}")
        if text.dim != self.model_config.text_dim:
            raise ConfigError(f"text encoder is {text.dim}-d, model.text_dim={self.model_config.text_dim}")
        d = rc.data
        msg = vae.check_size(d.num_frames, d.height, d.width)
        if msg:
            raise ConfigError(f"data: {msg}")
        return text, vae

    def _build_dataset(self) -> torch.utils.data.Dataset:
        d = self.recipe.data
        if d.dataset == "shapes":
            dataset = d.shapes_world()
        else:
            from vdiff.data.video_folder import VideoFolder

            dataset = VideoFolder(d.root, num_frames=d.num_frames, height=d.height, width=d.width,
                                  frame_stride=d.frame_stride)
        if d.latent_cache is None:
            return dataset
        from vdiff.data.latents import LatentDataset, build_latent_cache

        fingerprint = latent_cache_fingerprint(self.recipe, self.model_config.in_channels)
        acc = self.accelerator
        build_latent_cache(
            dataset, d.latent_cache,
            lambda v: self.vae.encode(v.to(self.device)), lambda p: self._encode_text(p), fingerprint,
            rank=acc.process_index, world=acc.num_processes, barrier=acc.wait_for_everyone,
            show_progress=acc.is_local_main_process)
        return LatentDataset(d.latent_cache)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(prompts)).embeds.to(self.device)  # (B, S, dim)

    # ---------------------------------------------------------------------------------------------------------------
    # The objective (override to train something else)
    # ---------------------------------------------------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """Flow matching (vdiff.diffusion.flow): predict v = noise - x0 at x_s = (1 - s) x0 + s noise."""
        r = self.recipe.train
        with torch.no_grad():
            if "latents" in batch:  # precomputed
                x0, text = batch["latents"].to(self.device), batch["text"].to(self.device)
            else:
                x0 = self.vae.encode(batch["video"].to(self.device)).float()  # (B, C, F, H, W)
                text = self._encode_text(batch["caption"])  # (B, S, dim)
            noise, sigmas, keep = [], [], []
            for index in batch["index"]:
                g = sample_generator(r.seed, step, int(index))
                noise.append(torch.randn(x0.shape[1:], generator=g))
                sigmas.append(sample_sigmas(1, self.recipe.flow, generator=g))
                keep.append(torch.rand(1, generator=g) >= r.cfg_dropout)
            noise = torch.stack(noise).to(self.device)  # (B, C, F, H, W)
            s = torch.cat(sigmas).to(self.device)  # (B,)
            keep = torch.cat(keep).to(self.device)  # (B,)
            text = torch.where(keep[:, None, None], text, self.empty_text.to(text.dtype))
            x_s = add_noise(x0, noise, s)
        kwargs = {"sequence_parallel": self.sp} if self.sp is not None else None
        v = self.model(x_s, timesteps_of(s), text, return_dict=False, attention_kwargs=kwargs)[0]
        return flow_loss(v, x0, noise)

    # ---------------------------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        acc, r = self.accelerator, self.recipe.train
        resumed_from = self._resume()
        start = self.progress.step
        sampler = ShardedBatchSampler(len(self.dataset), r.batch_size, self.dp_rank, self.dp_world,
                                      seed=self.recipe.data.seed, start=start * r.grad_accum)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=self.recipe.data.num_workers)
        batches = iter(loader)
        seen: list[int] = []
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "logs"))
            self._log_start(resumed_from)
        metrics_path = self.out / "metrics.jsonl"
        tokens_per_step = self.tokens_per_sample * r.batch_size * r.grad_accum * self.dp_world
        bar = tqdm(total=r.max_steps, initial=start, desc="train", disable=not self.is_main, unit="step",
                   dynamic_ncols=True)
        t_run, last_loss, losses = time.perf_counter(), float("nan"), []
        self.model.train()
        while self.progress.step < r.max_steps:
            step = self.progress.step
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)
            grad_norm = None
            for _ in range(r.grad_accum):
                batch = next(batches)
                seen += [int(i) for i in batch["index"]]
                with acc.accumulate(self.model):
                    loss = self.compute_loss(batch, step)
                    acc.backward(loss)
                    if acc.sync_gradients and acc.distributed_type.value != "DEEPSPEED":
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), r.grad_clip or float("inf"))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() / r.grad_accum
            if grad_norm is None:  # DeepSpeed clips inside its step and reports the norm afterwards
                grad_norm = self.model.get_global_grad_norm()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self._update_ema()
            self.progress.step = step = step + 1

            if step % r.log_every == 0 or step == r.max_steps:
                last_loss = acc.reduce(loss_sum, reduction="mean").item()
                losses.append(last_loss)
                dt = time.perf_counter() - t0
                row = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": tokens_per_step / dt, "step_s": dt}
                if self.is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        self.writer.add_scalar(f"train/{k}", row[k], step)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if step % r.checkpoint_every == 0 or step == r.max_steps:
                self.save_checkpoint(step)
            v = self.recipe.validation
            if v.every and step % v.every == 0 and step != r.max_steps:
                self.validate(step)
        bar.close()
        elapsed = time.perf_counter() - t_run
        if self.recipe.validation.at_end or (self.recipe.validation.every and r.max_steps % self.recipe.validation.every == 0):
            self.validate(self.progress.step)
        pipeline_dir = self.export() if r.export else None
        self._write_debug(seen)
        summary = {
            "steps": self.progress.step, "resumed_from": str(resumed_from) if resumed_from else None,
            "steps_this_run": self.progress.step - start, "seconds": elapsed,
            "tokens_per_s": tokens_per_step * (self.progress.step - start) / max(elapsed, 1e-9),
            "first_loss": losses[0] if losses else None, "final_loss": last_loss,
            "processes": acc.num_processes, "data_parallel": self.dp_world,
            "sequence_parallel": r.sequence_parallel, "deepspeed": r.deepspeed,
            "checkpoint": str(self.latest_checkpoint()), "pipeline": str(pipeline_dir) if pipeline_dir else None,
        }
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.writer.close()
            print(self._summary_text(summary), flush=True)
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    # ---------------------------------------------------------------------------------------------------------------
    # EMA, checkpoints, export, validation
    # ---------------------------------------------------------------------------------------------------------------

    def _zero3(self) -> bool:
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3

    def _full_params(self):
        """Context in which the unwrapped model's parameters are whole on every rank (gathered under ZeRO-3)."""
        params = list(self.accelerator.unwrap_model(self.model).parameters())
        if self._zero3():
            import deepspeed

            return params, deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return params, nullcontext()

    @torch.no_grad()
    def _update_ema(self) -> None:
        step, decay = self.progress.step, self.recipe.train.ema_decay
        decay = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the weights closely
        params, ctx = self._full_params()
        with ctx:
            ema = list(self.ema.parameters())
            torch._foreach_lerp_(ema, [p.detach().to(e.dtype) for p, e in zip(params, ema)], 1 - decay)

    def checkpoints(self) -> list[Path]:
        root = self.out / "checkpoints"
        found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name)] if root.is_dir() else []
        return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, step: int) -> Path:
        """accelerate.save_state into checkpoints/.tmp-step-N, then an atomic rename to checkpoints/step-N."""
        acc = self.accelerator
        root = self.out / "checkpoints"
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "recipe": to_dict(self.recipe)}, indent=2))
            if os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            if final.exists():  # re-reaching a step after resuming from an earlier checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-self.recipe.train.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _resume(self) -> Path | None:
        want = self.recipe.train.resume
        if want is None:
            return None
        if want == "latest":
            path = self.latest_checkpoint()
            if path is None:
                if self.is_main:
                    logger.warning("train.resume=latest: no checkpoint under %s/checkpoints, starting at step 0",
                                   self.out)
                return None
        else:
            path = Path(want)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume: checkpoint folder not found: {path}")
        self.accelerator.load_state(str(path))
        return path

    def _pipeline(self, for_export: bool):
        from vdiff.diffusion.sampling import make_scheduler
        from vdiff.pipeline import PipelineConfig, VideoPipeline

        rc, v = self.recipe, self.recipe.validation
        config = PipelineConfig(
            num_frames=rc.data.num_frames, height=rc.data.height, width=rc.data.width,
            num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
            text_encoder="minilm" if rc.text_encoder == "minilm" else "text_encoder",
            text_max_length=rc.text_max_length, attention=rc.model.attention)
        if not for_export:
            config.cache = []  # no hooks on the live EMA module
        return VideoPipeline(self.ema, self.text_encoder, self.vae, make_scheduler(v.sampler, v.shift), config)

    def export(self) -> Path | None:
        """output_dir/pipeline: the EMA transformer + VAE + scheduler + config, for VideoPipeline.from_pretrained."""
        path = self.out / "pipeline"
        if self.is_main:
            self._pipeline(for_export=True).save_pretrained(path)
        self.accelerator.wait_for_everyone()
        return path

    @torch.no_grad()
    def validate(self, step: int) -> list[Path]:
        """One mp4 per validation prompt from the EMA weights (main process; the others wait)."""
        paths: list[Path] = []
        v = self.recipe.validation
        if self.is_main and v.prompts:
            pipe = self._pipeline(for_export=False)
            folder = self.out / "samples" / f"step-{step:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, prompt in enumerate(v.prompts):
                out = pipe(prompt, seed=v.seed + i, num_inference_steps=v.num_inference_steps,
                           guidance_scale=v.guidance_scale)
                slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]
                paths.append(out.save(folder / f"{i:02d}-{slug}.mp4"))
                self.writer.add_text("validation/sample", f"{prompt}: {paths[-1]}", step)
            self.ema.requires_grad_(False)
        self.accelerator.wait_for_everyone()
        return paths

    # ---------------------------------------------------------------------------------------------------------------
    # Reporting
    # ---------------------------------------------------------------------------------------------------------------

    def _log_start(self, resumed_from: Path | None) -> None:
        r, acc = self.recipe.train, self.accelerator
        n_params = sum(p.numel() for p in self.ema.parameters())
        print(f"[train] {acc.num_processes} process(es) ({acc.distributed_type.value}, deepspeed={r.deepspeed}, "
              f"sequence_parallel={r.sequence_parallel}), device {self.device}, precision {acc.mixed_precision}; "
              f"model {n_params / 1e6:.2f}M params, attention={self.recipe.model.attention.backend}; "
              f"{len(self.dataset)} samples x {self.tokens_per_sample} tokens; global batch "
              f"{r.batch_size * r.grad_accum * self.dp_world}; "
              + (f"resumed from {resumed_from} at step {self.progress.step}" if resumed_from
                 else f"fresh start from the weights of {r.init_from}" if r.init_from else "fresh start"),
              flush=True)

    def _summary_text(self, s: dict[str, Any]) -> str:
        first = f"{s['first_loss']:.4f}" if s["first_loss"] is not None else "-"
        return "\n".join([
            "[train] done",
            f"  steps          {s['steps']} ({s['steps_this_run']} this run, {s['seconds']:.1f} s, "
            f"{s['tokens_per_s']:.0f} tokens/s)",
            f"  loss           {first} -> {s['final_loss']:.4f}",
            f"  processes      {s['processes']} (data parallel {s['data_parallel']}, sequence parallel "
            f"{s['sequence_parallel']}, deepspeed {s['deepspeed']})",
            f"  checkpoint     {s['checkpoint']}",
            f"  pipeline       {s['pipeline']}",
            f"  logs           {self.out / 'logs'} (tensorboard), {self.out / 'metrics.jsonl'}",
        ])

    def _write_debug(self, seen: list[int]) -> None:
        folder = os.environ.get(DEBUG_DIR_ENV)
        if not folder:
            return
        params, ctx = self._full_params()
        with ctx:
            digest = hashlib.sha256()
            for p in params:
                digest.update(p.detach().float().cpu().numpy().tobytes())
        Path(folder).mkdir(parents=True, exist_ok=True)
        rank = self.accelerator.process_index
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "dp_rank": self.dp_rank, "num_processes": self.accelerator.num_processes,
             "indices": seen, "param_sha256": digest.hexdigest()}))
