"""Evaluate a ShapesWorld text-to-video pipeline: generate clips over the grammar, read them back, score them.

    ./launch.sh eval                                           # the bundled model, checkpoints/shapes-tiny
    ./launch.sh eval --checkpoint outputs/shapes-tiny/pipeline num_clips=36 steps=10
    ./launch.sh eval attention=radial --out radial.json

Prompts cycle through all 72 "a {colour} {shape} moving {direction}" combinations in a seeded, balanced order;
every 12th clip is one of the 6 combinations held out of training (vdiff.data.shapes.HELD_OUT), reported apart.
Prints per-attribute accuracy (colour, shape, direction), the all-correct rate, the held-out rates, the temporal
consistency score and seconds per clip; writes the full report (per-clip readings too) as JSON.

key=value settings (omitted = the checkpoint's default sampling settings, from its vdiff.json):
  num_clips=144     clips to generate (a multiple of 72 covers every combination equally)
  steps=N           denoising steps                guidance=G   classifier-free guidance scale
  switch_guidance=G causal checkpoints: guidance away from the old prompt after a switch (1 = off)
  attention=NAME    dense | radial | vmoba | sliding_tile        sampler=unipc|euler   shift=S
  seed=0            prompt order + noise (batch b uses seed+b)   batch_size=16 clips per pipeline call
  num_frames=, height=, width=   clip size (default: the checkpoint's)

JSON goes to --out, by default CHECKPOINT/eval.json at default settings and CHECKPOINT/eval-<settings>.json otherwise.
Exit status 0 when the run completed (whatever the scores); --min-all-correct R makes it 1 below a rate R.

The same command is `python -m vdiff.eval` and, once vdiff is installed, `vdiff-eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, then key=value settings, which may sit between the flags as a user types them."""
    p = argparse.ArgumentParser(prog="./launch.sh eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="pipeline folder (VideoPipeline.from_pretrained); default checkpoints/shapes-tiny")
    p.add_argument("--out", type=Path, default=None, help="report JSON (default: next to the checkpoint, see above)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown here")
    p.add_argument("--save-clips", type=Path, default=None, metavar="DIR",
                   help="also write every generated clip as DIR/NNN-<prompt>.gif")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--min-all-correct", type=float, default=None, metavar="R",
                   help="exit 1 when the all-correct rate is below R (0..1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings (see above)")
    return p.parse_intermixed_args(argv)


def settings_tag(overrides: dict) -> str:
    """A file-name-safe tag of the settings, so reports at different settings land side by side."""
    return "-".join(f"{k}{v}" for k, v in sorted(overrides.items())).replace("/", "_") or "default"


def shown_path(path: Path) -> Path:
    """`path` relative to the working directory when it lies below it, as a user would type it.

    The default checkpoint is an absolute path (it works from any directory); a report run from the repository
    records it as `checkpoints/shapes-tiny`, as the committed eval.json does."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the run completed, 1 below --min-all-correct, 2 for a bad setting or checkpoint."""
    args = parse_args(argv)
    from vdiff.config import ConfigError, from_dict, parse_overrides
    from vdiff.eval.run import EvalConfig
    from vdiff.runtime import BUNDLED_CHECKPOINT, default_device

    try:
        overrides = parse_overrides(args.overrides)
        cfg = from_dict(EvalConfig, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ckpt = args.checkpoint if args.checkpoint is not None else shown_path(BUNDLED_CHECKPOINT)
    if not ckpt.is_dir():
        hint = " (the bundled model: checkpoints/shapes-tiny)" if args.checkpoint is None else ""
        print(f"error: --checkpoint {ckpt} is not a folder{hint}", file=sys.stderr)
        return 2
    out = args.out
    if out is None:
        out = ckpt / ("eval.json" if not overrides else f"eval-{settings_tag(overrides)}.json")

    import torch

    from vdiff.eval.run import format_report, run_eval
    from vdiff.pipeline import VideoPipeline

    device = args.device or str(default_device())
    pipe = VideoPipeline.from_pretrained(ckpt, device=device)
    causal = pipe.transformer.causal_config is not None
    for key in ("num_chunks", "switch_guidance"):
        if getattr(cfg, key) is not None and not causal:
            print(f"error: {key} is for causal (long-video) checkpoints; this one generates whole clips",
                  file=sys.stderr)
            return 2
    if causal and args.save_clips is not None:
        print("error: --save-clips is for whole-clip checkpoints; a causal eval keeps its per-chunk readings in the "
              "report (per_clip)", file=sys.stderr)
        return 2
    try:
        if causal:
            from vdiff.eval.long_run import format_long_report, run_long_eval

            report = run_long_eval(pipe, cfg, progress=not args.quiet)
        else:
            report = run_eval(pipe, cfg, progress=not args.quiet, keep_clips=args.save_clips is not None)
    except (ValueError, ConfigError) as err:  # a bad sampling setting, named by the pipeline
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["checkpoint"] = str(ckpt)
    report["command"] = "./launch.sh eval " + " ".join([f"--checkpoint {ckpt}"] + list(args.overrides))
    report["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if args.save_clips is not None:
        from vdiff.pipeline import write_video

        args.save_clips.mkdir(parents=True, exist_ok=True)
        for i, (clip, row) in enumerate(zip(report.pop("clips"), report["results"]["per_clip"])):
            slug = row["prompt"].replace(" ", "-")
            write_video(args.save_clips / f"{i:03d}-{slug}{'' if row['all_correct'] else '-WRONG'}.gif", clip)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    fmt = format_long_report if causal else format_report
    print(fmt(report))
    print(f"report: {out}")
    if args.markdown is not None:
        args.markdown.write_text(fmt(report, markdown=True) + "\n")
    rate = report["results"]["all_correct"]
    if args.min_all_correct is not None and rate < args.min_all_correct:
        print(f"all-correct rate {rate:.3f} is below --min-all-correct {args.min_all_correct}", file=sys.stderr)
        return 1
    return 0
