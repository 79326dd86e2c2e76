"""vdiff training: `python -m train --config configs/train/tiny.yaml [key=value ...]` (normally via
`./launch.sh train`, which starts one process per GPU with torchrun)."""

from train.config import TrainRecipe, load_recipe

__all__ = ["TrainRecipe", "load_recipe"]
