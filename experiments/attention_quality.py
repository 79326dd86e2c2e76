"""Quality vs attention: the same ShapesWorld recipe trained natively with each attention backend, then evaluated.

    python -m experiments.attention_quality                             # full recipe, every backend (GPU: minutes)
    python -m experiments.attention_quality --steps 300 --num-clips 36  # reduced size (CPU: say so in any table)

For each backend: `./launch.sh train --config RECIPE model.attention=... train.max_steps=STEPS output_dir=...`
(same seeds, same data, same steps), then `./launch.sh eval --checkpoint OUT/pipeline num_clips=N` (sampling with
the backend it was trained with: the exported pipeline keeps its attention config). Prints one row per backend:
the mean logged training loss over the last 10% of steps, eval scores (all-correct, held-out all-correct, per
attribute, temporal), training tokens/s and seconds per sampled clip, and writes
bench/results/attention-quality-<machine>.json. --skip-train evaluates runs trained elsewhere (e.g. two at a time
with the same overrides); the JSON says so.

A second stage per backend (the bundled model's shift-1 stage): `--init-from-root outputs/attention-quality --out-root
outputs/attention-quality-s2 --tag stage2 flow.shift=1.0 optim.lr=5e-4 optim.warmup_steps=50 --steps 1500`.
Run it from the repository root (it calls ./launch.sh train and ./launch.sh eval there).

Recipe overrides after the options apply to every backend (e.g. `data.height=16 data.width=16
model.patch_size=[1,1,1]` for the 16 x 16 reduced size of the README table). Backend settings follow the recipe's
token grid (T, H, W) (`backend_overrides`): radial block_size = H*W (one frame per block), sliding_tile tile
(2, H, W) window (3, 1, 1) (each 2-frame tile sees its neighbours in time), vmoba chunks of 2 frames / a whole frame /
2 whole frames, top-3. On the 16 x 4 x 4 grid of the 16 x 16 clips that keeps, of the 256 x 256 attention map measured
at sampling: radial ~12%, sliding_tile ~38%, vmoba ~53%. Change them with --set BACKEND.key=value.
The tables this measured (both stages, every backend): experiments/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("dense", "radial", "sliding_tile", "vmoba")


def token_grid(config: str, overrides: list[str]) -> tuple[int, int, int]:
    """(T, H, W) tokens of the recipe's clips: frames and pixels / PixelPatchVAE stride / patch size."""
    from train.config import load_recipe
    from vdiff.models.vae import PixelPatchVAE

    rc = load_recipe(config, overrides)
    if rc.vae != "pixel":
        raise SystemExit(f"{config}: needs vae=pixel (got {rc.vae!r})")
    mc = rc.model.to_model_config()
    latent = PixelPatchVAE.for_channels(mc.in_channels).latent_shape(rc.data.num_frames, rc.data.height, rc.data.width)
    return tuple(n // p for n, p in zip(latent, mc.patch_size))


def backend_overrides(name: str, grid: tuple[int, int, int]) -> list[str]:
    """The recipe overrides that select backend `name`, sized to the token grid (see the module docstring)."""
    _, h, w = grid
    a = "model.attention"
    return {
        "dense": [f"{a}.backend=dense"],
        "radial": [f"{a}.backend=radial", f"{a}.radial.block_size={h * w}"],
        "sliding_tile": [f"{a}.backend=sliding_tile", f"{a}.sliding_tile.tile=[2,{h},{w}]",
                         f"{a}.sliding_tile.window=[3,1,1]"],
        "vmoba": [f"{a}.backend=vmoba", f"{a}.vmoba.chunk_t=2", f"{a}.vmoba.chunk_hw=[{h},{w}]",
                  f"{a}.vmoba.chunk_thw=[2,{h},{w}]", f"{a}.vmoba.topk=3"],
    }[name]


def run(cmd: list[str]) -> None:
    """Echo and run one launcher command from the repository root; a failed train or eval stops the sweep."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.attention_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train/shapes_tiny.yaml")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipe's)")
    p.add_argument("--num-clips", type=int, default=144)
    p.add_argument("--out-root", default="outputs/attention-quality")
    p.add_argument("--set", action="append", default=[], metavar="BACKEND.key=value",
                   help="extra recipe override for one backend, e.g. radial.model.attention.radial.decay_factor=0.9")
    p.add_argument("--skip-train", action="store_true", help="only evaluate runs already under --out-root")
    p.add_argument("--init-from-root", default=None, metavar="DIR",
                   help="a second stage: each backend starts from DIR/<backend>/pipeline (train.init_from), e.g. the "
                        "first stage's --out-root, with stage-2 overrides such as flow.shift=1.0")
    p.add_argument("--tag", default=None, help="results go to bench/results/attention-quality-<tag>-<machine>.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every backend")
    args = p.parse_intermixed_args(argv)

    grid = token_grid(args.config, args.overrides)
    print(f"token grid {grid}", flush=True)
    rows = []
    for name in args.backends.split(","):
        if name not in BACKENDS:
            raise SystemExit(f"--backends: unknown {name!r}; known: {list(BACKENDS)}")
        out = Path(args.out_root) / name
        extra = [s.split(".", 1)[1] for s in args.set if s.split(".", 1)[0] == name]
        overrides = [*args.overrides, *backend_overrides(name, grid), *extra, f"output_dir={out}",
                     "validation.at_end=false"]
        if args.steps:
            overrides.append(f"train.max_steps={args.steps}")
        if args.init_from_root:
            overrides.append(f"train.init_from={Path(args.init_from_root) / name / 'pipeline'}")
        if not args.skip_train:
            run(["./launch.sh", "train", "--config", args.config, *overrides])
        report_path = out / "eval.json"
        run(["./launch.sh", "eval", "--checkpoint", str(out / "pipeline"), "--out", str(report_path), "--quiet",
             f"num_clips={args.num_clips}"])
        summary = json.loads((out / "summary.json").read_text())
        # step -> loss; the last entry per step wins (a resumed run re-logs the steps it replays)
        losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r}
        tail = [loss for step, loss in losses.items() if step > 0.9 * summary["steps"]]  # one batch each: average
        rep = json.loads(report_path.read_text())
        res = rep["results"]
        rows.append({
            "backend": name, "steps": summary["steps"], "final_loss": round(summary["final_loss"], 4),
            "loss_last_10pct": round(sum(tail) / len(tail), 4) if tail else None,
            "all_correct": res["all_correct"], "heldout_all_correct": res["heldout"]["all_correct"],
            "colour": res["colour"], "shape": res["shape"], "direction": res["direction"],
            "temporal": round(res["temporal"], 3), "train_tokens_per_s": round(summary["tokens_per_s"]),
            "s_per_clip": round(rep["seconds_per_clip"], 3), "overrides": overrides,
        })
    from bench.common import machine_info, print_table, write_result

    cols = ["backend", "steps", "loss_last_10pct", "all_correct", "heldout_all_correct", "colour", "shape", "direction",
            "temporal", "train_tokens_per_s", "s_per_clip"]
    print_table(rows, cols, title="quality vs attention (ShapesWorld, natively trained)")
    meta = {"config": args.config, "overrides": args.overrides, "grid": grid, "steps": args.steps,
            "num_clips": args.num_clips, "init_from_root": args.init_from_root, "skip_train": args.skip_train,
            "command": " ".join(sys.argv), "machine": machine_info()}
    write_result("attention-quality" + (f"-{args.tag}" if args.tag else ""), rows, meta,
                 launch=" ".join(["python", "-m", "experiments.attention_quality", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
