"""The training loop: flow matching for VideoDiT, 1 CPU process to N GPUs on M nodes, wired from components:

    train/distributed.py   Accelerator, DeepSpeed / FSDP, sequence-parallel groups, gradient norm, whole parameters
    train/data.py          encoders, datasets and the latent cache, the sharded data order, per-sample generators
    train/checkpoint.py    atomic checkpoints, keep-N, latest, resume; initial weights for a fine-tune
    train/export.py        the exported pipeline, validation samples, export of a mid-run checkpoint
    train/report.py        start line, metrics.jsonl + TensorBoard, summary

`run` does only forward/backward/step, EMA, logging, checkpoints and validation. A new objective overrides
`compute_loss(batch, step)`; a new update rule overrides `train_step(batch, step)`.

Exactness (a run killed and resumed logs the same losses as one that was not, and 2 processes the same as 1 with the
same global batch): randomness per sample comes from (seed, step, index) and the data order from (seed, epoch), see
train/data.py; the checkpoint holds model, optimizer, LR schedule, EMA, progress and RNG.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from train.checkpoint import BeforePublish, CheckpointManager, Progress, load_initial_weights
from train.config import TrainRecipe
from train.data import batches, build_dataset, build_encoders, sample_generator
from train.distributed import Distributed
from train.export import export_pipeline, validation_samples
from train.objectives import CausalObjectives
from train.report import MetricsLog, start_line, summary_text, write_rank_record
from vdiff.attention import MaskCache
from vdiff.config import ConfigError, to_dict
from vdiff.diffusion.flow import add_noise, flow_loss, sample_sigmas, timesteps_of
from vdiff.lora import add_lora, trainable_parameters
from vdiff.models.dit import VideoDiT
from vdiff.parallel import apply_sequence_parallel

TEXT_MEMO_BYTES = 256 * 2**20  # the caption-embedding memo's bound (Trainer.encode_text); ~5000 MiniLM captions


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warm-up, then constant / cosine / linear decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


class Trainer(CausalObjectives):
    """One training run of `recipe`. `before_publish(tmp_folder, step)` is called by the main process after a
    checkpoint's files are written and before it is published (tests kill the run there); with `debug_dir`, every
    rank writes the sample indices it read and a hash of its final parameters there (tests compare ranks)."""

    def __init__(self, recipe: TrainRecipe, *, before_publish: BeforePublish | None = None,
                 debug_dir: str | Path | None = None):
        self.recipe, self.out, self.debug_dir = recipe, Path(recipe.output_dir), debug_dir
        r = recipe.train
        self.dist = Distributed.setup(r, self.out)
        acc = self.accelerator = self.dist.accelerator
        self.device, self.is_main = self.dist.device, self.dist.is_main
        self.sp, self.dp_rank, self.dp_world = self.dist.sequence_parallel, self.dist.dp_rank, self.dist.dp_world
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
        if r.lora is not None:  # seeded, before the EMA copy and prepare(): every rank and run start the same adapter
            add_lora(model, r.lora, seed=r.seed)
        model.to(self.device)
        model.set_attention(recipe.model.attention)  # raises now if the backend cannot run (or train) here
        if r.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        if self.sp is not None:  # after the EMA copy: the EMA module samples on one rank, unsplit
            apply_sequence_parallel(model, self.sp)
        self.mask_cache = MaskCache()  # sparse masks built once for the run, not once per step
        self.text_memo: OrderedDict[str, torch.Tensor] = OrderedDict()  # caption -> (S, dim), see encode_text
        self.text_memo_bytes = 0
        with self.dist.whole_encoders():
            self.text_encoder, self.vae = build_encoders(recipe, self.model_config, self.device)
        self.dataset = build_dataset(recipe, self.model_config.in_channels,
                                     lambda v: self.vae.encode(v.to(self.device)), self.encode_text, acc)
        self.tokens_per_sample = math.prod(model.token_grid(self.vae.latent_shape(
            recipe.data.num_frames, recipe.data.height, recipe.data.width)))

        o = recipe.optim
        params = trainable_parameters(model) if r.lora is not None else model.parameters()  # LoRA: adapters only
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps,
                                      weight_decay=o.weight_decay)
        # Stepped here once per optimizer step (not via prepare(): Accelerate would step it once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, o.warmup_steps, r.max_steps, o.schedule, o.min_lr_ratio))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.progress = Progress()
        acc.register_for_checkpointing(self.scheduler, self.ema, self.progress)
        self.checkpoints = CheckpointManager(self.out, acc, r.keep_checkpoints, before_publish)
        self.empty_text = self.encode_text([""])  # (1, S, dim): the unconditional caption for CFG dropout
        # ShapesWorld clips that turn at a chunk boundary (data.switch_prob): teacher forcing gives each chunk its
        # segment's caption (train.objectives._text_switch)
        self.switch_world = recipe.data.shapes_world() if recipe.data.switch_prob > 0 else None
        if self.switch_world is not None:
            per = self.model_config.causal.chunk_frames * self.vae.stride[0] if self.model_config.causal else 0
            if r.objective != "teacher_forcing" or recipe.data.switch_every % max(per, 1) or not per:
                raise ConfigError(f"data.switch_prob > 0 trains prompt switches with train.objective=teacher_forcing "
                                  f"and data.switch_every a multiple of a chunk's {per} frames (chunk boundaries); "
                                  f"got objective={r.objective}, switch_every={recipe.data.switch_every}")
        self.metrics: MetricsLog | None = None
        self.seen: list[int] = []  # sample indices this rank read, in order

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all data-parallel ranks (the throughput unit)."""
        r = self.recipe.train
        return self.tokens_per_sample * r.batch_size * r.grad_accum * self.dp_world

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Caption embeddings (B, S, dim). The text encoder is frozen, so a caption is encoded once, alone, and kept in
        a least-recently-used memo of at most TEXT_MEMO_BYTES: its embedding never depends on the batch it came in
        (a resumed run, an uninterrupted one and any process count see the same numbers), and a dataset whose
        captions repeat (ShapesWorld has a few hundred) stops paying the encoder on every step."""
        memo, rows = self.text_memo, []
        for p in prompts:
            row = memo.get(p)
            if row is None:
                row = memo[p] = self.text_encoder.encode([p]).embeds[0].to(self.device)  # (S, dim)
                self.text_memo_bytes += row.nbytes
                while len(memo) > 1 and self.text_memo_bytes > TEXT_MEMO_BYTES:
                    self.text_memo_bytes -= memo.popitem(last=False)[1].nbytes
            else:
                memo.move_to_end(p)
            rows.append(row)
        return torch.stack(rows)

    # ---------------------------------------------------------------------------------------------------------------
    # The objective (override compute_loss to train something else)
    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def clean_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 latents (B, C, F, H, W), caption embeddings (B, S, dim)): read from the latent cache, or encoded now."""
        if "latents" in batch:
            return batch["latents"].to(self.device), batch["text"].to(self.device)
        return self.vae.encode(batch["video"].to(self.device)).float(), self.encode_text(batch["caption"])

    def model_forward(self, x: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                      chunks: list[tuple[int, bool]] | None = None,
                      text_switch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The one call of the trained model: velocity at `timesteps` (B,) or per token (B, L), in [0, 1000];
        `chunks`: a causal model's chunk layout (None: chunks 0..n-1); `text_switch`: a second text and the tokens
        that attend it (clips that turn). (Sequence parallelism, when on, is a hook installed on the model in
        __init__.)"""
        kwargs = {"mask_cache": self.mask_cache, "chunks": chunks}
        if text_switch is not None:
            kwargs["text_switch"] = text_switch
        return self.model(x, timesteps, text, return_dict=False, attention_kwargs=kwargs)[0]

    @torch.no_grad()
    def sample_draws(self, batch: dict[str, Any], step: int, x0: torch.Tensor, text: torch.Tensor, levels: int = 1,
                     context: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every sample's random draws, from its own generator (train.data.sample_generator), in this order: noise
        like x0, `levels` noise levels, whether its caption is kept (else the empty caption, for CFG), and with
        `context` a second noise for context copies. Returns (noise (B, C, F, H, W), sigmas (B, levels), text with
        dropped captions, context noise or None)."""
        r = self.recipe.train
        noise, sigmas, keep, ctx_eps = [], [], [], []
        for index in batch["index"]:
            g = sample_generator(r.seed, step, int(index))
            noise.append(torch.randn(x0.shape[1:], generator=g))
            sigmas.append(sample_sigmas(levels, self.recipe.flow, generator=g))
            keep.append(torch.rand(1, generator=g) >= r.cfg_dropout)
            if context:
                ctx_eps.append(torch.randn(x0.shape[1:], generator=g))
        keep = torch.cat(keep).to(self.device)  # (B,)
        text = torch.where(keep[:, None, None], text, self.empty_text.to(text.dtype))  # (B, S, dim)
        return (torch.stack(noise).to(self.device), torch.stack(sigmas).to(self.device), text,
                torch.stack(ctx_eps).to(self.device) if context else None)

    def compute_loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """The loss of `train.objective`: one method per objective (loss_flow here, the causal ones in
        train/objectives.py); a subclass overrides one of them, or this."""
        return getattr(self, f"loss_{self.recipe.train.objective}")(batch, step)

    def loss_flow(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """Flow matching (vdiff.diffusion.flow): predict v = noise - x0 at x_s = (1 - s) x0 + s noise. Each sample's
        noise, level s and caption dropout come from its own generator (train.data.sample_generator)."""
        with torch.no_grad():
            x0, text = self.clean_inputs(batch)  # (B, C, F, H, W), (B, S, dim)
            noise, s, text, _ = self.sample_draws(batch, step, x0, text)
            s = s[:, 0]  # (B,)
            x_s = add_noise(x0, noise, s)  # (B, C, F, H, W)
        return flow_loss(self.model_forward(x_s, timesteps_of(s), text), x0, noise)

    def train_step(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, Any]:
        """One micro-batch: loss, backward, and on the micro-batch that ends an accumulation window, clipping and
        the optimizer step. Returns (the detached loss, the gradient norm before clipping or None when no step was
        taken)."""
        acc, grad_norm = self.accelerator, None
        with acc.accumulate(self.model):
            loss = self.compute_loss(batch, step)
            acc.backward(loss)
            if acc.sync_gradients:
                grad_norm = self.dist.clip_grad_norm(self.model, self.recipe.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    # ---------------------------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        r, v = self.recipe.train, self.recipe.validation
        resumed_from = self.resume()
        start = self.progress.step
        data = batches(self.dataset, r.batch_size, self.dp_rank, self.dp_world, seed=self.recipe.data.seed,
                       start=start * r.grad_accum, num_workers=self.recipe.data.num_workers)
        if self.is_main:
            self.metrics = MetricsLog(self.out)
            print(start_line(self, resumed_from), flush=True)
        bar = tqdm(total=r.max_steps, initial=start, desc="train", disable=not self.is_main, unit="step",
                   dynamic_ncols=True)
        t_run, losses = time.perf_counter(), []
        self.model.train()
        while self.progress.step < r.max_steps:
            step, t0 = self.progress.step, time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)  # mean loss over the accumulation window
            grad_norm = None
            for _ in range(r.grad_accum):
                batch = next(data)
                self.seen += [int(i) for i in batch["index"]]
                loss, norm = self.train_step(batch, step)
                grad_norm = norm if norm is not None else grad_norm
                loss_sum += loss / r.grad_accum
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.update_ema()
            self.progress.step = step = step + 1
            if step % r.log_every == 0 or step == r.max_steps:
                losses.append(self.log_step(step, loss_sum, lr, grad_norm, t0, bar))
            bar.update(1)
            if step % r.checkpoint_every == 0 or step == r.max_steps:
                self.save_checkpoint(step)
            if v.every and step % v.every == 0 and step != r.max_steps:
                self.validate(step)
        bar.close()
        return self.finish(start, resumed_from, time.perf_counter() - t_run, losses)

    def log_step(self, step: int, loss_sum: torch.Tensor, lr: float, grad_norm: Any, t0: float, bar: Any) -> float:
        """Reduce the step's loss over ranks (every rank takes part) and log it from the main process."""
        loss = self.accelerator.reduce(loss_sum, reduction="mean").item()
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": self.tokens_per_step / dt, "step_s": dt}
        if self.is_main:
            self.metrics.write(row)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        return loss

    def finish(self, start: int, resumed_from: Path | None, elapsed: float, losses: list[float]) -> dict[str, Any]:
        """After the last step: final validation, export, summary (summary.json + printed), end of training."""
        r, v, acc = self.recipe.train, self.recipe.validation, self.accelerator
        if v.at_end or (v.every and r.max_steps % v.every == 0):
            self.validate(self.progress.step)
        pipeline_dir = self.export() if r.export else None
        if self.debug_dir:
            with self.dist.full_parameters(self.model) as params:
                write_rank_record(self.debug_dir, acc.process_index, self.dp_rank, acc.num_processes, self.seen,
                                  params)
        steps_this_run = self.progress.step - start
        summary = {
            "steps": self.progress.step, "resumed_from": str(resumed_from) if resumed_from else None,
            "steps_this_run": steps_this_run, "seconds": elapsed,
            "tokens_per_s": self.tokens_per_step * steps_this_run / max(elapsed, 1e-9),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else float("nan"),
            "processes": acc.num_processes, "data_parallel": self.dp_world,
            "sequence_parallel": r.sequence_parallel, "deepspeed": r.deepspeed,
            "checkpoint": str(self.checkpoints.latest()), "pipeline": str(pipeline_dir) if pipeline_dir else None,
        }
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.metrics.close()
            print(summary_text(summary, self.out), flush=True)
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    # ---------------------------------------------------------------------------------------------------------------
    # EMA, checkpoints, export, validation
    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_ema(self) -> None:
        step, decay = self.progress.step, self.recipe.train.ema_decay
        decay = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the weights closely
        with self.dist.full_parameters(self.model) as params:
            pairs = [(e, p) for p, e in zip(params, self.ema.parameters()) if p.requires_grad]  # LoRA: adapters
            ema = [e for e, _ in pairs]
            torch._foreach_lerp_(ema, [p.detach().to(e.dtype) for e, p in pairs], 1 - decay)

    def save_checkpoint(self, step: int) -> Path:
        return self.checkpoints.save(step, {"step": step, "recipe": to_dict(self.recipe)})

    def resume(self) -> Path | None:
        """Restore train.resume (latest | a folder) into model, optimizer, schedule, EMA, progress and RNG."""
        return self.checkpoints.resume(self.recipe.train.resume)

    def export(self) -> Path:
        """output_dir/pipeline: the EMA transformer + VAE + scheduler + config, for VideoPipeline.from_pretrained."""
        return export_pipeline(self.recipe, self.ema, self.text_encoder, self.vae, self.accelerator,
                               self.out / "pipeline")

    def validate(self, step: int) -> list[Path]:
        """One mp4 per validation prompt from the EMA weights, under output_dir/samples/step-N."""
        writer = self.metrics.writer if self.metrics is not None else None
        return validation_samples(self.recipe, self.ema, self.text_encoder, self.vae, self.accelerator,
                                  self.out / "samples" / f"step-{step:08d}", writer, step)
