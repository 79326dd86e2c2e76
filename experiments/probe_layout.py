"""Does a ShapesWorld model decide the layout from the caption? A probe of the prediction from pure noise.

    python -m experiments.probe_layout --checkpoint checkpoints/shapes-tiny [--seeds 32] [--config RECIPE k=v ...]

At s = 1 the model sees pure noise, so the best it can do is predict the data's mean clip for the caption. For a
direction, that mean is a band moving across the frame; a model that ignores the direction word predicts the same
mean for "moving left" and "moving right". This prints, for pairs of prompts that differ in one attribute, the mean
absolute difference between the model's mean x0 predictions (over --seeds noise draws; pixels in [-1, 1]) next to
the same difference for ShapesWorld's own clips, and the correlation of the model's mean with the data's mean per
prompt (1 = the layout is the data's). Seconds on a CPU; use it to compare recipes long before an eval.

--shape-gain adds a second table, for the shape word: real clips noised to s, the model's x0 prediction under each
shape caption, and how the prediction's caption-to-caption difference lines up with the true difference between the
two shapes' clips (cosine, and gain = projection / true norm^2: 1 = the caption moves the prediction all the way,
0 = the caption is ignored). Where the layout is known (s <= ~0.6) the image decides; the caption's work is at
s ~ 0.7-0.95.

--roundness adds a third table, for the circle's detail: real circles (one per colour) noised to s, the model's x0
prediction captioned "circle" and "square", read back by the evaluator's roundness cue (1/3 for a disc, 0 for a
square, split at 0.2; the noisy input itself reads ~0.35 at small s). A model whose low-noise denoiser knows circles
keeps its prediction round at s = 0.05-0.2; one that does not makes it squarer than its own input, and the sampler's
last step hands the clip that prediction.

Clip size defaults to the checkpoint's own (vdiff.json); the reference clips use the recipe's data.position_jitter
(--config, with the same key=value overrides as the trainer; default the bundled recipe). What it measured on the
bundled model and its predecessors: experiments/README.md.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vdiff.pipeline import VideoPipeline

PAIRS = [
    ("direction", "a red square moving left", "a red square moving right"),
    ("direction", "a green circle moving up", "a green circle moving down"),
    ("colour", "a red square moving left", "a blue square moving left"),
    ("shape", "a red square moving left", "a red circle moving left"),
]


def data_mean(prompt: str, n: int, frames: int, height: int, width: int, jitter: float = 1.0) -> torch.Tensor:
    from vdiff.data.shapes import clip_to_video, parse_caption, render_clip

    colour, shape, direction = parse_caption(prompt)
    clips = [clip_to_video(render_clip(colour, shape, direction, seed=s, num_frames=frames, height=height,
                                       width=width, position_jitter=jitter)) for s in range(n)]
    return torch.stack(clips).mean(0)  # (3, T, H, W) in [-1, 1]


@torch.no_grad()
def model_mean(pipe: VideoPipeline, prompt: str, seeds: int, frames: int, height: int, width: int) -> torch.Tensor:
    model, vae = pipe.transformer, pipe.vae
    text = pipe.text_encoder.encode([prompt] * seeds).embeds.to(pipe.device)
    shape = vae.encode(torch.zeros(1, 3, frames, height, width, device=pipe.device)).shape[1:]  # (C, F, H, W)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(seeds, *shape, generator=g).to(pipe.device)
    t = torch.full((seeds,), 1000.0, device=pipe.device)
    v = model(noise, t, text).sample
    x0 = noise - v  # s = 1
    return vae.decode(x0).float().clamp(-1, 1).mean(0)  # (3, T, H, W)


def real_clips(pipe: VideoPipeline, shape: str, frames: int, height: int, width: int,
               jitter: float) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """One ShapesWorld clip of `shape` per colour, directions cycling: ((colour, direction) pairs, [N, 3, T, H, W])."""
    from vdiff.data.shapes import COLOURS, DIRECTIONS, clip_to_video, render_clip

    combos = [(c, DIRECTIONS[i % len(DIRECTIONS)]) for i, c in enumerate(COLOURS)]
    videos = torch.stack([clip_to_video(render_clip(c, shape, d, seed=i, num_frames=frames, height=height,
                                                    width=width, position_jitter=jitter))
                          for i, (c, d) in enumerate(combos)]).to(pipe.device)
    return combos, videos


@torch.no_grad()
def x0_prediction(pipe: VideoPipeline, latents: torch.Tensor, s: float, captions: list[str]) -> torch.Tensor:
    """Decoded x0 prediction [N, 3, T, H, W] of `latents` noised to s (noise seed 1), captioned `captions`."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)).to(pipe.device)
    xs = (1 - s) * latents + s * noise
    t = torch.full((len(captions),), 1000.0 * s, device=pipe.device)
    text = pipe.text_encoder.encode(captions).embeds.to(pipe.device)
    return pipe.vae.decode(xs - s * pipe.transformer(xs, t, text).sample).float()


@torch.no_grad()
def shape_gain(pipe: VideoPipeline, s: float, frames: int, height: int, width: int, jitter: float, base: str = "square",
               pair: tuple[str, str] = ("circle", "square")) -> tuple[float, float]:
    """(cosine, gain) of x0(caption pair[0]) - x0(caption pair[1]) against the true clip difference, at noise s."""
    from vdiff.data.shapes import caption

    videos = {shape: real_clips(pipe, shape, frames, height, width, jitter) for shape in {base, *pair}}
    combos, x0 = videos[base][0], pipe.vae.encode(videos[base][1])
    pred = {shape: x0_prediction(pipe, x0, s, [caption(c, shape, d) for c, d in combos]) for shape in pair}
    got = (pred[pair[0]] - pred[pair[1]]).flatten()
    true = (videos[pair[0]][1] - videos[pair[1]][1]).flatten()
    return float(got @ true / (got.norm() * true.norm() + 1e-12)), float(got @ true / (true @ true))


@torch.no_grad()
def x0_roundness(pipe: VideoPipeline, s: float, frames: int, height: int, width: int, jitter: float, caption_shape: str,
                 shape: str = "circle") -> tuple[float, int, int]:
    """(median roundness, clips read as `shape`, clips) of the x0 predictions of real `shape` clips noised to s."""
    from vdiff.data.shapes import caption, video_to_clip
    from vdiff.eval.shapes_eval import read_clip

    combos, videos = real_clips(pipe, shape, frames, height, width, jitter)
    pred = x0_prediction(pipe, pipe.vae.encode(videos), s, [caption(c, caption_shape, d) for c, d in combos])
    readings = [read_clip(video_to_clip(v)) for v in pred.clamp(-1, 1).cpu()]
    values = torch.tensor([r.info.get("roundness", float("nan")) for r in readings])
    return float(values.nanmedian()), sum(r.shape == shape for r in readings), len(readings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.probe_layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pipeline folder")
    p.add_argument("--seeds", type=int, default=32, help="noise draws averaged per prompt")
    p.add_argument("--data-clips", type=int, default=200, help="ShapesWorld clips averaged per prompt")
    p.add_argument("--frames", type=int, default=None, help="default: the checkpoint's num_frames")
    p.add_argument("--size", type=int, default=None, help="height = width; default: the checkpoint's")
    p.add_argument("--shape-gain", action="store_true", help="also print the shape-word table (see above)")
    p.add_argument("--roundness", action="store_true", help="also print the circle-detail table (see above)")
    p.add_argument("--config", default="configs/train/shapes_tiny.yaml",
                   help="the recipe the checkpoint was trained with: its data.position_jitter shapes the reference "
                        "clips")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as given to the trainer")
    args = p.parse_intermixed_args(argv)

    from train.config import load_recipe
    from vdiff.pipeline import VideoPipeline

    jitter = load_recipe(args.config, args.overrides).data.position_jitter
    pipe = VideoPipeline.from_pretrained(args.checkpoint)
    frames = args.frames or pipe.config.num_frames
    height, width = (args.size, args.size) if args.size else (pipe.config.height, pipe.config.width)
    dims = (frames, height, width)
    print(f"{frames} x {height} x {width} clips, reference position_jitter {jitter}")
    prompts = sorted({q for _, a, b in PAIRS for q in (a, b)})
    dm = {q: data_mean(q, args.data_clips, *dims, jitter=jitter) for q in prompts}
    mm = {q: model_mean(pipe, q, args.seeds, *dims) for q in prompts}
    print(f"{'differ in':10} {'prompt A':28} {'prompt B':28} {'data':>7} {'model':>7}")
    for kind, a, b in PAIRS:
        print(f"{kind:10} {a:28} {b:28} {(dm[a] - dm[b]).abs().mean():7.4f} {(mm[a] - mm[b]).abs().mean():7.4f}")
    print("correlation of the model's mean clip with the data's (per prompt):")
    for q in prompts:
        x, y = dm[q].flatten() - dm[q].mean(), mm[q].flatten() - mm[q].mean()
        print(f"  {q:28} {float((x * y).sum() / (x.norm() * y.norm() + 1e-12)):.3f}")
    if args.shape_gain:
        print("shape word: x0 prediction from a real square clip noised to s, captioned A vs B, against the true A - B")
        print(f"{'s':>5} {'circle-square cos':>18} {'gain':>6} {'circle-triangle cos':>20} {'gain':>6}")
        for s in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
            cs = shape_gain(pipe, s, *dims, jitter)
            ct = shape_gain(pipe, s, *dims, jitter, pair=("circle", "triangle"))
            print(f"{s:5.2f} {cs[0]:18.3f} {cs[1]:6.2f} {ct[0]:20.3f} {ct[1]:6.2f}")
    if args.roundness:
        print("circle detail: x0 prediction of real circles (one per colour) noised to s, evaluator roundness "
              "(disc 1/3, square 0, split 0.2) and clips read as circle")
        print(f"{'s':>5} {'captioned circle':>17} {'read':>6} {'captioned square':>17} {'read':>6}")
        for s in (0.05, 0.1, 0.2, 0.35, 0.5):
            rc, nc, n = x0_roundness(pipe, s, *dims, jitter, "circle")
            rs, ns, _ = x0_roundness(pipe, s, *dims, jitter, "square")
            print(f"{s:5.2f} {rc:17.3f} {nc:4d}/{n} {rs:17.3f} {ns:4d}/{n}")


if __name__ == "__main__":
    main()
