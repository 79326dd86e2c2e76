"""The eval job for causal (long-video) checkpoints: `./launch.sh eval --checkpoint DIR num_chunks=16`.

Clips use the short eval's prompts (`eval_prompts`: balanced over the 72 combinations, 1 in 12 held out), generated
`batch_size` at a time with `VideoPipeline.stream` for `num_chunks` chunks (batch b: seed + b), and read per chunk
by vdiff.eval.long_eval: per-chunk colour / shape / direction / all-correct (the drift curve), first-4 and last-4
all-correct, the seam ratio. A second set of clips switches the prompt half-way (same colour and shape, a turned
direction: left -> up -> right -> down -> left) and reports the share whose motion follows the new prompt within
one chunk, colour and shape kept.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from vdiff.config import ConfigError
from vdiff.data.shapes import caption, parse_caption
from vdiff.eval.long_eval import score_long_clip, summarize_long
from vdiff.eval.run import EvalConfig, _pct, eval_prompts

TURN = {"left": "up", "up": "right", "right": "down", "down": "left"}


def _generate(pipe: Any, prompts: list[str], cfg: EvalConfig, num_chunks: int, switch_at: int | None,
              bar: Any) -> tuple[list[np.ndarray], list[list[str]], float]:
    """Clips (T, H, W, 3) and the prompt in force per chunk; seconds per chunk (wall, batched). With `switch_at`,
    each clip turns its own direction there, so those clips run one by one (a switch applies to a whole stream)."""
    clips, in_force, t0 = [], [], time.perf_counter()
    kw = {"num_chunks": num_chunks, "num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance,
          "attention": cfg.attention, "sampler": cfg.sampler, "shift": cfg.shift, "height": cfg.height,
          "width": cfg.width, "switch_guidance": cfg.switch_guidance}
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = prompts[start:start + cfg.batch_size]
        if switch_at is None:
            streams = [(batch, None)]
            in_force += [[p] * num_chunks for p in batch]
        else:
            turned = [caption(c, s, TURN[d]) for c, s, d in map(parse_caption, batch)]
            streams = [([p], {switch_at: q}) for p, q in zip(batch, turned)]
            in_force += [[p] * switch_at + [q] * (num_chunks - switch_at) for p, q in zip(batch, turned)]
        for texts, switch in streams:
            chunks = list(pipe.stream(texts, seed=cfg.seed + b, prompts=switch, **kw))
            clips += list(np.concatenate([c.videos for c in chunks], axis=1))
        bar.update(len(batch))
    return clips, in_force, (time.perf_counter() - t0) / max(1, len(prompts) * num_chunks)


def run_long_eval(pipe: Any, cfg: EvalConfig, *, progress: bool = True, switch: bool = True) -> dict[str, Any]:
    """The long eval's report. `switch=False` leaves out the prompt-switch clips (a test regenerating a prefix of
    the plain clips: chunk c of a stream does not depend on how many chunks follow it)."""
    from tqdm.auto import tqdm

    if cfg.num_frames is not None:
        raise ConfigError(f"num_frames={cfg.num_frames}: a causal eval's length is num_chunks (chunks per clip)")
    num_chunks = cfg.num_chunks or 16
    per = pipe.transformer.causal_config.chunk_frames * pipe.vae.stride[0]
    prompts = eval_prompts(cfg.num_clips, cfg.seed)
    switch_prompts = prompts[: max(1, cfg.num_clips // 4)] if switch else []
    bar = tqdm(total=len(prompts) + len(switch_prompts), desc="eval (long)", unit="clip", disable=not progress)
    clips, in_force, s_chunk = _generate(pipe, prompts, cfg, num_chunks, None, bar)
    scores = [score_long_clip(c, f, per) for c, f in zip(clips, in_force)]
    at = num_chunks // 2
    s_scores = []
    if switch_prompts:
        s_clips, s_force, _ = _generate(pipe, switch_prompts, cfg, num_chunks, at, bar)
        s_scores = [score_long_clip(c, f, per, switch_at=at) for c, f in zip(s_clips, s_force)]
    bar.close()
    pc = pipe.config
    return {
        "kind": "long",
        "settings": {"num_clips": cfg.num_clips, "num_chunks": num_chunks, "frames_per_chunk": per,
                     "batch_size": cfg.batch_size, "seed": cfg.seed,
                     "steps": cfg.steps or pc.num_inference_steps,
                     "guidance": cfg.guidance if cfg.guidance is not None else pc.guidance_scale,
                     "attention": cfg.attention if cfg.attention is not None else pc.attention.backend,
                     "sampler": cfg.sampler if cfg.sampler is not None else "checkpoint default",
                     "shift": cfg.shift if cfg.shift is not None else "checkpoint default",
                     "height": cfg.height or pc.height, "width": cfg.width or pc.width,
                     "causal": asdict(pipe.transformer.causal_config), "caches": pipe.caches,
                     "switch_clips": len(switch_prompts), "switch_at": at,
                     "switch_guidance": cfg.switch_guidance if cfg.switch_guidance is not None
                     else pc.switch_guidance, "switch_guidance_chunks": pc.switch_guidance_chunks},
        "config": asdict(cfg),
        "results": summarize_long(scores),
        "switch": summarize_long(s_scores) if s_scores else {},
        # per clip: its prompt and, chunk by chunk, the (colour, shape, direction) read (switch: the new prompt's)
        "per_clip": [{"prompt": p, "read": [row["read"] for row in sc["chunks"]]} for p, sc in zip(prompts, scores)],
        "switch_per_clip": [{"prompt": p, "new_prompt": f[-1], "followed": bool(sc["switch_followed"]),
                             "read": [row["read"] for row in sc["chunks"]]}
                            for p, f, sc in zip(switch_prompts, s_force, s_scores)] if s_scores else [],
        "seconds_per_chunk": s_chunk,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": str(pipe.device)},
    }


def format_long_report(report: dict[str, Any], markdown: bool = False) -> str:
    """The long eval's table (per-chunk drift curve, first-4 / last-4, seam, switch) as text or Markdown."""
    s, r, sw = report["settings"], report["results"], report["switch"]
    g = s.get("switch_guidance", 1.0)
    guided = f" (switch guidance {g} over {s.get('switch_guidance_chunks')} chunks)" if g and g > 1 else ""
    head = (f"{s['num_clips']} clips x {s['num_chunks']} chunks ({s['frames_per_chunk']} frames each), "
            f"{s['steps']} steps, guidance {s['guidance']}, window {s['causal']['window_chunks']}, seed {s['seed']}")
    tail = [f"all-correct {_pct(r['all_correct'])} (first 4 chunks {_pct(r['first4_all_correct'])}, last 4 "
            f"{_pct(r['last4_all_correct'])}); seam ratio {r['seam_ratio']:.3f}",
            f"prompt switch at chunk {s['switch_at']} ({s['switch_clips']} clips): followed within one chunk "
            f"{_pct(sw.get('switch_followed'))}{guided}" if sw else "no prompt-switch clips",
            f"{report['seconds_per_chunk']:.3f} s per chunk ({report['machine']['device']})"]
    cols = ("colour", "shape", "direction", "all_correct")
    if markdown:
        lines = [head, "", "| chunk | colour | shape | direction | all correct |", "|---|---|---|---|---|"]
        lines += [f"| {i} | " + " | ".join(_pct(p[k]) for k in cols) + " |" for i, p in enumerate(r["per_chunk"])]
        return "\n".join(lines + [""] + [f"- {line}" for line in tail])
    lines = [head, "  chunk     colour      shape  direction  all correct"]
    for i, p in enumerate(r["per_chunk"]):
        lines.append(f"  {i:5d} {_pct(p['colour']):>10} {_pct(p['shape']):>10} {_pct(p['direction']):>10} "
                     f"{_pct(p['all_correct']):>12}")
    return "\n".join(lines + tail)
