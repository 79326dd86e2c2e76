"""Entry point of one training process: `python -m train --config FILE [key=value ...]`.

Started once per GPU (or CPU process) by `./launch.sh train`, which wraps torchrun; running it directly trains in
one process."""

from __future__ import annotations

import argparse
import json
import sys

from vdiff.config import ConfigError, to_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a VideoDiT with flow matching (Accelerate + DeepSpeed). Multi-process and multi-node runs "
                    "are started with ./launch.sh train (torchrun).",
        epilog="overrides: dotted keys of the recipe, e.g. train.max_steps=10 model.attention.backend=radial "
               "train.deepspeed=zero2 train.resume=latest output_dir=runs/x. Unknown keys are errors. "
               "--print-config shows every key.")
    parser.add_argument("--config", help="training recipe YAML (configs/train/*.yaml); defaults when omitted")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    from train.config import load_recipe

    try:
        recipe = load_recipe(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(to_dict(recipe), indent=2))
        return 0
    from train.trainer import Trainer

    Trainer(recipe).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
