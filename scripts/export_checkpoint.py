"""Export a training checkpoint (EMA weights) as a pipeline folder, while the run that wrote it goes on.

    python scripts/export_checkpoint.py --config configs/train/shapes_tiny.yaml \\
        --checkpoint outputs/shapes-tiny/checkpoints/step-00001000 --out outputs/snap-1000

The trainer exports output_dir/pipeline only at the end of a run; this loads a checkpoint into the trainer
(`train.resume=CHECKPOINT`, the same code path as resuming) and calls its `export()`, so a snapshot can be
evaluated with `./launch.sh eval --checkpoint OUT` mid-run. The snapshot's own trainer state goes to a scratch
output_dir (OUT/.trainer), so the running job's folder is never written.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoints/step-N folder, or a run folder "
                   "(its latest checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides used for the run")
    args = p.parse_intermixed_args()

    from train.config import load_recipe
    from train.trainer import Trainer

    ckpt = args.checkpoint
    if (ckpt / "checkpoints").is_dir():
        found = sorted(q for q in (ckpt / "checkpoints").iterdir() if q.name.startswith("step-"))
        if not found:
            raise SystemExit(f"{ckpt}: no checkpoints/step-N folder")
        ckpt = found[-1]
    scratch = args.out / ".trainer"
    recipe = load_recipe(args.config, [*args.overrides, f"train.resume={ckpt}", f"output_dir={scratch}"])
    trainer = Trainer(recipe)
    trainer._resume()
    exported = trainer.export()
    if args.out.exists():
        for child in args.out.iterdir():
            if child.name != ".trainer":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in exported.iterdir():
        shutil.move(str(child), args.out / child.name)
    shutil.rmtree(scratch)
    (args.out / "SNAPSHOT.txt").write_text(f"exported from {ckpt} (step {trainer.progress.step}, EMA weights)\n")
    print(f"{ckpt} (step {trainer.progress.step}) -> {args.out}")


if __name__ == "__main__":
    main()
