"""How fast does a causal ShapesWorld model turn after a prompt switch? The object's velocity, chunk by chunk.

    python -m experiments.switch_trace --checkpoint checkpoints/shapes-causal [--clips 36] [--switch-at 8]

The long eval (vdiff.eval.long_run) asks whether the frames right after a switch read as the new direction; this
says how the motion gets there. Each clip streams one of the eval's prompts and switches at chunk --switch-at to
the eval's turned direction (left -> up -> right -> down -> left, colour and shape kept). Per frame, the object's
position is the evaluator's circular centroid (vdiff.eval.long_eval); per chunk, the mean frame-to-frame
displacement into each of its frames is projected on the old and on the new direction and divided by ShapesWorld's
speed per frame. The same curve of ShapesWorld's own clips (rendered with the turn) is printed beside it: 1 / 0
before the switch, 0.5 / 0.5 in the switch chunk (its first frame is still placed by the old motion; 0 / 1 with a
recipe's data.turn=crisp), 0 / 1 after.
A model that keeps the old motion for a while shows old > 0 after the switch chunk and new rising over chunks.

--context data asks whether the model can turn at all, apart from its own earlier chunks: the chunks before the
switch are ShapesWorld's own (the clip rendered with the turn, noised to the checkpoint's context_noise, every one
on the new caption, as a re-cached stream holds them and as teacher forcing trains), and the model generates the
chunks from the switch on through the full block-causal forward (the stream's reference path). --context self
(default) streams the model's own chunks. Both print the turn curve and how many clips' first SWITCH_FRAMES frames
after the switch read as the new prompt (the long eval's "switch followed"). Seconds per clip on a CPU. What it
measured: experiments/README.md.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch


def velocities(frames_THW3: np.ndarray) -> np.ndarray:
    """(T - 1, 2) frame-to-frame displacement (dx, dy) of the object's circular centroid, wrapped to the nearest
    copy (the world wraps around the frame)."""
    from vdiff.eval.long_eval import _centre

    h, w = frames_THW3.shape[1:3]
    pos = np.array([(_centre(f, 1), _centre(f, 0)) for f in frames_THW3])  # (T, 2) x, y
    d = np.diff(pos, axis=0)
    d[:, 0] = (d[:, 0] + w / 2) % w - w / 2
    d[:, 1] = (d[:, 1] + h / 2) % h - h / 2
    return d


def turn_curve(frames_THW3: np.ndarray, frames_per_chunk: int, old: str, new: str) -> np.ndarray:
    """(num_chunks, 2): per chunk, the mean displacement into the chunk's frames projected on the old and the new
    direction, in units of ShapesWorld's speed per frame (chunk 0 has one displacement fewer)."""
    from vdiff.data.shapes import DEFAULT_SPEED, DIRECTION_VECTORS
    from vdiff.data.shapes_long import REFERENCE_FRAMES

    side = frames_THW3.shape[2]  # every direction moves the same px/frame on a square frame
    speed = DEFAULT_SPEED * side / (REFERENCE_FRAMES - 1)
    d = velocities(frames_THW3)  # d[i]: frame i -> i + 1
    axes = np.array([DIRECTION_VECTORS[old], DIRECTION_VECTORS[new]], dtype=np.float64)  # (2, 2)
    proj = d @ axes.T / speed  # (T - 1, 2)
    n = len(frames_THW3) // frames_per_chunk
    # displacements ending in chunk c's frames: into frame f for f in [c * k, (c + 1) * k), f >= 1
    return np.stack([proj[max(0, c * frames_per_chunk - 1):(c + 1) * frames_per_chunk - 1].mean(0)
                     for c in range(n)])


def turned_clip(colour: str, shape: str, direction: str, switch_at: int, num_chunks: int, per: int, height: int,
                width: int, seed: int, *, position_jitter: float, motion_jitter: float | None,
                turn: str = "carry") -> np.ndarray:
    """ShapesWorld's wrap-around clip (T, H, W, 3) that turns from `direction` to the eval's turned one at chunk
    `switch_at`, its start spread as a recipe's data.position_jitter / data.motion_jitter, its turn as data.turn."""
    from vdiff.data.shapes_long import render_long_clip
    from vdiff.eval.long_run import TURN

    return render_long_clip(colour, shape, [direction] * switch_at + [TURN[direction]] * (num_chunks - switch_at),
                            segment_frames=per, height=height, width=width, seed=seed,
                            position_jitter=position_jitter, motion_jitter=motion_jitter, turn=turn)


@torch.no_grad()
def after_data_context(pipe: Any, clip: np.ndarray, switch_at: int, colour: str, shape: str, new: str,
                       seed: int) -> np.ndarray:
    """(T, H, W, 3): `clip` (ShapesWorld's, turning at chunk `switch_at`) for the chunks before it, the model's
    chunks from it on, each generated through the full block-causal forward over every earlier chunk's context
    latents (noised to context_noise) on the new caption, with the checkpoint's sampler and steps (no guidance)."""
    from vdiff.data.shapes import caption, clip_to_video
    from vdiff.pipeline_io import to_uint8

    model, vae = pipe.transformer, pipe.vae
    f = model.causal_config.chunk_frames
    per = f * vae.stride[0]
    num_chunks = len(clip) // per
    x0 = vae.encode(clip_to_video(clip)[None].float())  # (1, C, F, H', W')
    g = torch.Generator().manual_seed(seed)
    s = pipe.config.context_noise
    context = [(1 - s) * x0[:, :, j * f:(j + 1) * f] + s * torch.randn(x0[:, :, :f].shape, generator=g)
               for j in range(switch_at)]
    text = pipe.text_encoder.encode([caption(colour, shape, new)]).embeds
    tokens = math.prod(model.token_grid(x0[:, :, :f].shape[2:]))
    out = []
    for k in range(switch_at, num_chunks):
        x = torch.randn(x0[:, :, :f].shape, generator=g)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(pipe.config.num_inference_steps)
        chunks = [(j, True) for j in range(len(context))] + [(k, False)]
        for t in scheduler.timesteps:
            t_in = torch.cat([torch.full((len(context) * tokens,), 1000.0 * s), t.float().expand(tokens)])[None]
            v = model(torch.cat([*context, x], dim=2), t_in, text, return_dict=False,
                      attention_kwargs={"chunks": chunks})[0][:, :, -f:]
            x = scheduler.step(v, t, x, return_dict=False)[0]
        out.append(x)
        context.append((1 - s) * x + s * torch.randn(x.shape, generator=g))
    generated = to_uint8(vae.decode(torch.cat(out, dim=2)))[0]  # (T', H, W, 3)
    return np.concatenate([clip[:switch_at * per], generated])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/shapes-causal", help="a causal pipeline folder")
    parser.add_argument("--clips", type=int, default=36, help="switched clips (the eval's first prompts)")
    parser.add_argument("--switch-at", type=int, default=8, help="the chunk where the prompt switches")
    parser.add_argument("--after", type=int, default=5, help="chunks shown after the switch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", choices=["self", "data"], default="self",
                        help="the chunks before the switch: the model's own (a stream) or ShapesWorld's")
    parser.add_argument("--config", default="configs/train/shapes_causal.yaml",
                        help="the recipe whose data.position_jitter / data.motion_jitter / data.turn draw "
                             "ShapesWorld's clips")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.switch_at < 1 or args.after < 1:
        parser.error("--clips, --switch-at and --after must be >= 1")

    from train.config import load_recipe
    from vdiff.data.shapes import caption, parse_caption
    from vdiff.eval.long_eval import SWITCH_FRAMES, read_switch
    from vdiff.eval.long_run import TURN
    from vdiff.eval.run import eval_prompts
    from vdiff.pipeline import VideoPipeline

    data_cfg = load_recipe(args.config).data
    pipe = VideoPipeline.from_pretrained(args.checkpoint)
    per = pipe.transformer.causal_config.chunk_frames * pipe.vae.stride[0]
    num_chunks = args.switch_at + args.after + 1
    curves, data_curves, followed = [], [], 0
    for i, prompt in enumerate(eval_prompts(args.clips, args.seed)):
        colour, shape, direction = parse_caption(prompt)
        turned = caption(colour, shape, TURN[direction])
        clip_seed = args.seed * 100_003 + i
        data = turned_clip(colour, shape, direction, args.switch_at, num_chunks, per, pipe.config.height,
                           pipe.config.width, clip_seed, position_jitter=data_cfg.position_jitter,
                           motion_jitter=data_cfg.motion_jitter, turn=data_cfg.turn)
        data_curves.append(turn_curve(data, per, direction, TURN[direction]))
        if args.context == "self":
            chunks = list(pipe.stream([prompt], seed=args.seed, prompts={args.switch_at: turned},
                                      num_chunks=num_chunks))
            frames = np.concatenate([c.videos for c in chunks], axis=1)[0]  # (T, H, W, 3)
        else:
            frames = after_data_context(pipe, data, args.switch_at, colour, shape, TURN[direction],
                                        seed=clip_seed)
        curves.append(turn_curve(frames, per, direction, TURN[direction]))
        followed += read_switch(frames, args.switch_at, per) == (colour, shape, TURN[direction])
    mean, data_mean = np.mean(curves, axis=0), np.mean(data_curves, axis=0)  # (num_chunks, 2) each
    print(f"{args.checkpoint}, context {args.context}: {args.clips} clips, switch at chunk {args.switch_at}; "
          f"{followed}/{args.clips} read as the new prompt over the {SWITCH_FRAMES} frames from the switch on; motion "
          f"per chunk in units of the data's speed")
    print(f"{'chunk':>8} {'old dir':>8} {'new dir':>8} {'data old':>9} {'data new':>9}")
    for c in range(max(1, args.switch_at - 2), num_chunks):
        print(f"{c - args.switch_at:>+8d} {mean[c, 0]:>8.2f} {mean[c, 1]:>8.2f} {data_mean[c, 0]:>9.2f} "
              f"{data_mean[c, 1]:>9.2f}")


if __name__ == "__main__":
    main()
