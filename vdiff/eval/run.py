"""The ShapesWorld eval job: generate clips over the grammar with fixed seeds and score them with the evaluator.

    from vdiff.eval.run import EvalConfig, run_eval, format_report
    report = run_eval(pipe, EvalConfig(num_clips=144))        # pipe: a VideoPipeline
    print(format_report(report))

Prompts (`eval_prompts`): `num_clips` clips cycle through all 72 colour-shape-direction combinations, each round of
72 in a seeded random order, arranged so that every 12th clip is one of the 6 HELD_OUT combinations: any prefix of
the list (36 clips, 144 clips, ...) is balanced, and 1 clip in 12 is held out (never seen in training), reported
separately as `heldout` (compositional generalisation), the others as `seen`.

Seeds: clips are generated `batch_size` at a time; batch b uses seed `seed + b` (the pipeline draws one batch's noise
from one generator), so the clips, and the scores, are fixed by (checkpoint, settings, seed, batch_size).

Timing: `seconds_per_clip` = wall time of generation (text encoding + denoising + decoding, batched) / clips, on the
machine that ran it (`machine` in the report); `denoise_step_s` = mean time of one denoising step of one batch.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vdiff.config import ConfigError
from vdiff.data.shapes import COLOURS, DIRECTIONS, HELD_OUT, SHAPES, caption
from vdiff.eval.shapes_eval import evaluate_clips

HELD_OUT_EVERY = 12  # 72 / 6: one held-out combination per 12 clips


@dataclass
class EvalConfig:
    """What `./launch.sh eval` generates. None = the checkpoint's default sampling setting (its vdiff.json)."""

    num_clips: int = 144
    steps: int | None = None  # denoising steps
    guidance: float | None = None  # classifier-free guidance scale
    attention: str | None = None  # dense | radial | vmoba | sliding_tile
    sampler: str | None = None  # unipc | euler
    shift: float | None = None
    seed: int = 0
    batch_size: int = 16
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_chunks: int | None = None  # causal checkpoints: chunks per clip (default 16; vdiff.eval.long_run)
    switch_guidance: float | None = None  # causal checkpoints: guidance away from the old prompt after a switch

    def __post_init__(self) -> None:
        if self.num_chunks is not None and self.num_chunks < 4:
            raise ConfigError(f"num_chunks must be >= 4 (first-4 vs last-4 chunks), got {self.num_chunks}")
        if self.num_clips < 1:
            raise ConfigError(f"num_clips must be >= 1, got {self.num_clips}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0, got {self.guidance}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.switch_guidance is not None:
            from vdiff.pipeline_io import check_switch_guidance

            check_switch_guidance(self.switch_guidance, 1, ConfigError)


def eval_prompts(num_clips: int, seed: int = 0) -> list[str]:
    """`num_clips` captions over the 72 combinations, balanced in every prefix (see the module docstring)."""
    held = [c for c in HELD_OUT]
    seen = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if (c, s, d) not in set(HELD_OUT)]
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < num_clips:
        h = [held[i] for i in rng.permutation(len(held))]
        s = [seen[i] for i in rng.permutation(len(seen))]
        for k in range(len(h)):  # 6 groups of 12: one held-out combination, then 11 seen ones
            out.append(caption(*h[k]))
            out += [caption(*x) for x in s[k * (HELD_OUT_EVERY - 1):(k + 1) * (HELD_OUT_EVERY - 1)]]
    return out[:num_clips]


def _call_kwargs(cfg: EvalConfig) -> dict[str, Any]:
    names = {"steps": "num_inference_steps", "guidance": "guidance_scale", "attention": "attention",
             "sampler": "sampler", "shift": "shift", "num_frames": "num_frames", "height": "height", "width": "width"}
    return {call: getattr(cfg, field) for field, call in names.items() if getattr(cfg, field) is not None}


def run_eval(pipe: Any, cfg: EvalConfig, *, progress: bool = True, keep_clips: bool = False) -> dict[str, Any]:
    """Generate `cfg.num_clips` clips with `pipe` (a VideoPipeline) and score them.

    Returns {"settings": the resolved sampling settings, "prompts_seed", "results": evaluate_clips(...) (overall
    rates, "seen", "heldout", "per_clip"), "seconds_per_clip", "denoise_step_s", "wall_s", "machine"}, plus
    "clips" (uint8 [T, H, W, 3] each, in prompt order) when `keep_clips`.
    """
    from tqdm.auto import tqdm

    prompts = eval_prompts(cfg.num_clips, cfg.seed)
    kwargs = _call_kwargs(cfg)
    clips: list[np.ndarray] = []
    step_s: list[float] = []
    bar = tqdm(total=len(prompts), desc="eval", unit="clip", disable=not progress)
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = prompts[start:start + cfg.batch_size]
        out = pipe(batch, seed=cfg.seed + b, **kwargs)
        clips += list(out.videos)  # (T, H, W, 3) uint8 each
        step_s += list(out.stats.step_s)
        bar.update(len(batch))
    wall = time.perf_counter() - t0
    bar.close()
    pc = pipe.config
    settings = {
        "num_clips": cfg.num_clips, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "steps": cfg.steps if cfg.steps is not None else pc.num_inference_steps,
        "guidance": cfg.guidance if cfg.guidance is not None else pc.guidance_scale,
        "attention": cfg.attention if cfg.attention is not None else pc.attention.backend,
        "sampler": cfg.sampler if cfg.sampler is not None else "checkpoint default",
        "shift": cfg.shift if cfg.shift is not None else "checkpoint default",
        "num_frames": cfg.num_frames or pc.num_frames, "height": cfg.height or pc.height,
        "width": cfg.width or pc.width,
    }
    report = {
        "settings": settings,
        "config": asdict(cfg),
        "results": evaluate_clips(clips, prompts),
        "seconds_per_clip": wall / len(prompts),
        "denoise_step_s": float(np.mean(step_s)) if step_s else None,
        "wall_s": wall,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": str(pipe.device)},
        "held_out_combinations": [caption(*c) for c in HELD_OUT],
    }
    if keep_clips:
        report["clips"] = clips
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict[str, Any], markdown: bool = False) -> str:
    """The per-attribute table (all clips / seen combinations / held-out combinations) and the timing line."""
    r, s = report["results"], report["settings"]
    rows = [("all", r), ("seen", r["seen"]), ("held-out", r["heldout"])]
    cols = ["clips", "colour", "shape", "direction", "all correct", "temporal"]
    cells = [[name, str(x["num_clips"]), _pct(x["colour"]), _pct(x["shape"]), _pct(x["direction"]),
              _pct(x["all_correct"]), "-" if x["temporal"] is None else f"{x['temporal']:.3f}"] for name, x in rows]
    head = (f"{s['num_clips']} clips, {s['num_frames']}x{s['height']}x{s['width']}, {s['steps']} steps, "
            f"guidance {s['guidance']}, attention {s['attention']}, seed {s['seed']}, batch {s['batch_size']}")
    timing = (f"{report['seconds_per_clip']:.3f} s per clip ({report['machine']['device']}, batched), "
              f"{report['denoise_step_s']:.3f} s per denoising step of a batch")
    if markdown:
        lines = [head, "", "| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines + ["", timing])
    widths = [max(len(x), 9) for x in ["split"] + cols]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [head, fmt.format("split", *cols)] + [fmt.format(*c) for c in cells]
    return "\n".join(lines + [timing])
