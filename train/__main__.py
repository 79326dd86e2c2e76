"""Command line of training:

    python -m train [--config FILE] [key=value ...]              one training process (./launch.sh train runs one
                                                                  per GPU or CPU process under torchrun)
    python -m train --check [--config FILE] [key=value ...]      validate the recipe and overrides: exit 0 silently,
                                                                  or print one `config error: ...` line and exit 2
    python -m train cache --config FILE [key=value ...]          fill a ShapesWorld latent cache (+ meta.json)
    python -m train export --config FILE --checkpoint DIR --out DIR [key=value ...]
                                                                  a checkpoint's EMA weights as a pipeline folder

The subcommands are recognised by the first word, so overrides never need a `train` prefix of their own.
"""

from __future__ import annotations

import argparse
import json
import sys

from vdiff.config import ConfigError, to_dict

OVERRIDES_HELP = ("overrides: dotted keys of the recipe, e.g. train.max_steps=10 model.attention.backend=radial "
                  "train.deepspeed=zero2 train.resume=latest output_dir=runs/x. Unknown keys are errors. "
                  "--print-config shows every key.")


def _config_error(err: Exception) -> int:
    print(f"config error: {err}", file=sys.stderr)
    return 2


def _load(config: str | None, overrides: list[str]):
    """The recipe, with the checks that need no model or process group (the DeepSpeed config file exists)."""
    from train.config import deepspeed_config_path, load_recipe

    recipe = load_recipe(config, overrides)
    if recipe.train.deepspeed != "none":
        deepspeed_config_path(recipe.train.deepspeed)
    return recipe


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a VideoDiT with flow matching (Accelerate + DeepSpeed). Multi-process and multi-node runs "
                    "are started with ./launch.sh train (torchrun). Subcommands: cache, export (see "
                    "`python -m train cache --help`).", epilog=OVERRIDES_HELP)
    parser.add_argument("--config", help="training recipe YAML (configs/train/*.yaml); defaults when omitted")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    parser.add_argument("--check", action="store_true", help="validate the recipe and overrides, then exit: 0 when "
                        "they are valid (silently), 2 with a one-line `config error: ...` when not")
    parser.add_argument("--debug-dir", help="each rank writes rankR.json here at the end: the sample indices it "
                        "read and a hash of its final parameters (for the distributed tests)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        recipe = _load(args.config, args.overrides)
    except ConfigError as err:
        return _config_error(err)
    if args.check:
        return 0
    if args.print_config:
        print(json.dumps(to_dict(recipe), indent=2))
        return 0
    from train.trainer import Trainer

    Trainer(recipe, debug_dir=args.debug_dir).run()
    return 0


def cache_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train cache",
        description="Fill the recipe's ShapesWorld latent cache (data.latent_cache) in one process, each of its "
                    "captions text-encoded once, and write meta.json with the trainer's fingerprint, so the trainer "
                    "and LatentDataset read it at once. Needs data.dataset=shapes, text_encoder=minilm, vae=pixel.",
        epilog=OVERRIDES_HELP)
    parser.add_argument("--config", required=True, help="training recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    from train.data import fill_shapes_cache
    from vdiff.data.latents import LatentDataset

    try:
        recipe = _load(args.config, args.overrides)
        folder = fill_shapes_cache(recipe)
    except ConfigError as err:
        return _config_error(err)
    print(f"{folder}: {len(LatentDataset(folder))} items, meta.json written")
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train export",
        description="Export a training checkpoint's EMA weights as a pipeline folder while the run that wrote it "
                    "goes on (the checkpoint is restored as a resume would; the run's own folder is not written), "
                    "so a snapshot can be evaluated with ./launch.sh eval --checkpoint OUT.", epilog=OVERRIDES_HELP)
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N folder, or a run folder (its "
                        "latest checkpoint)")
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides used for the run")
    args = parser.parse_intermixed_args(argv)
    from train.export import export_checkpoint

    try:
        ckpt, step = export_checkpoint(args.config, args.checkpoint, args.out, args.overrides)
    except ConfigError as err:
        return _config_error(err)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{ckpt} (step {step}) -> {args.out}")
    return 0


COMMANDS = {"cache": cache_main, "export": export_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
