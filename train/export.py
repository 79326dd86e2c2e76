"""From training weights to something that samples: the pipeline a run exports, its validation videos, and the
export of a checkpoint while the run that wrote it goes on (`python -m train export`).

Both the export and the validation videos use the EMA weights, through the same `VideoPipeline` a user loads, so a
validation sample is what `VideoPipeline.from_pretrained(output_dir/pipeline)` would give for the same seed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import list_checkpoints
from train.config import TrainRecipe, load_recipe


def build_pipeline(recipe: TrainRecipe, transformer: torch.nn.Module, text_encoder: Any, vae: Any,
                   for_export: bool):
    """A VideoPipeline over the given modules with the recipe's clip size, sampler and attention. Validation runs
    without inference caches: their hooks would stay on the live EMA module the loop keeps updating."""
    from vdiff.diffusion.sampling import make_scheduler
    from vdiff.pipeline import PipelineConfig, VideoPipeline

    v = recipe.validation
    config = PipelineConfig(
        num_frames=recipe.data.num_frames, height=recipe.data.height, width=recipe.data.width,
        num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
        text_encoder="minilm" if recipe.text_encoder == "minilm" else "text_encoder",
        text_max_length=recipe.text_max_length, attention=recipe.model.attention,
        context_noise=recipe.train.context_noise)
    if recipe.model.to_model_config().causal is not None:
        config.cache = ["text_kv", "causal_kv", "prompt"]  # chunk by chunk over the causal KV cache
    if not for_export:
        config.cache = []
    return VideoPipeline(transformer, text_encoder, vae, make_scheduler(v.sampler, v.shift), config)


def export_pipeline(recipe: TrainRecipe, ema: torch.nn.Module, text_encoder: Any, vae: Any, accelerator: Any,
                    path: str | Path) -> Path:
    """Write a pipeline folder (EMA transformer + VAE + scheduler + config) from the main process; all ranks wait."""
    path = Path(path)
    if accelerator.is_main_process:
        build_pipeline(recipe, ema, text_encoder, vae, for_export=True).save_pretrained(path)
    accelerator.wait_for_everyone()
    return path


@torch.no_grad()
def validation_samples(recipe: TrainRecipe, ema: torch.nn.Module, text_encoder: Any, vae: Any, accelerator: Any,
                       folder: str | Path, writer: Any = None, step: int = 0) -> list[Path]:
    """One mp4 per validation prompt (seed validation.seed + i) into `folder`, from the main process; the others
    wait. Each path is also logged to `writer` (a TensorBoard SummaryWriter) when one is given."""
    paths: list[Path] = []
    v = recipe.validation
    if accelerator.is_main_process and v.prompts:
        pipe = build_pipeline(recipe, ema, text_encoder, vae, for_export=False)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(v.prompts):
            out = pipe(prompt, seed=v.seed + i, num_inference_steps=v.num_inference_steps,
                       guidance_scale=v.guidance_scale)
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]
            paths.append(out.save(folder / f"{i:02d}-{slug}.mp4"))
            if writer is not None:
                writer.add_text("validation/sample", f"{prompt}: {paths[-1]}", step)
        ema.requires_grad_(False)  # the pipeline may have switched it on; the EMA copy is never trained
    accelerator.wait_for_everyone()
    return paths


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoints/step-N folder as given, or a run folder's latest checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{path}: no checkpoints/step-N folder")
        return found[-1]
    return path


def export_checkpoint(config: str | Path | None, checkpoint: str | Path, out: str | Path,
                      overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, int]:
    """Export a checkpoint's EMA weights as a pipeline folder at `out`; returns (checkpoint, its step).

    The trainer is built from the recipe the checkpoint was trained with and restored exactly as a resume would
    (train.resume=CHECKPOINT), so the snapshot is what the run would have exported at that step. Its own scratch
    state goes to OUT/.trainer, so the running job's folder is never written."""
    from train.trainer import Trainer

    ckpt, out = resolve_checkpoint(checkpoint), Path(out)
    scratch = out / ".trainer"
    recipe = load_recipe(config, [*overrides, f"train.resume={ckpt}", f"output_dir={scratch}"])
    trainer = Trainer(recipe)
    trainer.resume()
    exported = trainer.export()
    if out.exists():
        for child in out.iterdir():
            if child.name != ".trainer":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in exported.iterdir():
        shutil.move(str(child), out / child.name)
    shutil.rmtree(scratch)
    step = trainer.progress.step
    (out / "SNAPSHOT.txt").write_text(f"exported from {ckpt} (step {step}, EMA weights)\n")
    return ckpt, step
