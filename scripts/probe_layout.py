"""Does a ShapesWorld model decide the layout from the caption? A probe of the prediction from pure noise.

    python scripts/probe_layout.py --checkpoint checkpoints/shapes-tiny [--seeds 32] [--config RECIPE key=value ...]

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

Clip size defaults to the checkpoint's own (vdiff.json); the reference clips use the recipe's data.position_jitter
(--config, with the same key=value overrides as the trainer; default the bundled recipe).
"""

from __future__ import annotations

import argparse

import torch

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
def model_mean(pipe, prompt: str, seeds: int, frames: int, height: int, width: int) -> torch.Tensor:
    model, vae = pipe.transformer, pipe.vae
    text = pipe.text_encoder.encode([prompt] * seeds).embeds.to(pipe.device)
    shape = vae.encode(torch.zeros(1, 3, frames, height, width, device=pipe.device)).shape[1:]  # (C, F, H, W)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(seeds, *shape, generator=g).to(pipe.device)
    t = torch.full((seeds,), 1000.0, device=pipe.device)
    v = model(noise, t, text).sample
    x0 = noise - v  # s = 1
    return vae.decode(x0).float().clamp(-1, 1).mean(0)  # (3, T, H, W)


@torch.no_grad()
def shape_gain(pipe, s: float, frames: int, height: int, width: int, jitter: float, base: str = "square",
               pair: tuple[str, str] = ("circle", "square")) -> tuple[float, float]:
    """(cosine, gain) of x0(caption pair[0]) - x0(caption pair[1]) against the true clip difference, at noise s."""
    from vdiff.data.shapes import COLOURS, DIRECTIONS, clip_to_video, render_clip

    model, vae = pipe.transformer, pipe.vae
    combos = [(c, DIRECTIONS[i % len(DIRECTIONS)]) for i, c in enumerate(COLOURS)]

    def clips(shape: str) -> torch.Tensor:
        return torch.stack([clip_to_video(render_clip(c, shape, d, seed=i, num_frames=frames, height=height,
                                                      width=width, position_jitter=jitter))
                            for i, (c, d) in enumerate(combos)]).to(pipe.device)  # (N, 3, T, H, W)

    x0 = vae.encode(clips(base))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(pipe.device)
    xs = (1 - s) * x0 + s * noise
    t = torch.full((len(combos),), 1000.0 * s, device=pipe.device)
    pred = {}
    for shape in pair:
        text = pipe.text_encoder.encode([f"a {c} {shape} moving {d}" for c, d in combos]).embeds.to(pipe.device)
        pred[shape] = vae.decode(xs - s * model(xs, t, text).sample).float()
    got = (pred[pair[0]] - pred[pair[1]]).flatten()
    true = (clips(pair[0]) - clips(pair[1])).flatten()
    return float(got @ true / (got.norm() * true.norm() + 1e-12)), float(got @ true / (true @ true))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pipeline folder")
    p.add_argument("--seeds", type=int, default=32, help="noise draws averaged per prompt")
    p.add_argument("--data-clips", type=int, default=200, help="ShapesWorld clips averaged per prompt")
    p.add_argument("--frames", type=int, default=None, help="default: the checkpoint's num_frames")
    p.add_argument("--size", type=int, default=None, help="height = width; default: the checkpoint's")
    p.add_argument("--shape-gain", action="store_true", help="also print the shape-word table (see above)")
    p.add_argument("--config", default="configs/train/shapes_tiny.yaml",
                   help="the recipe the checkpoint was trained with: its data.position_jitter shapes the reference clips")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as given to the trainer")
    args = p.parse_args()

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


if __name__ == "__main__":
    main()
