"""vdiff training: `python -m train --config configs/train/tiny.yaml [key=value ...]` (normally via
`./launch.sh train`, which starts one process per GPU with torchrun), plus `python -m train cache` (fill a latent
cache) and `python -m train export` (a checkpoint as a pipeline folder). The loop is `train.trainer.Trainer`."""

from train.config import TrainRecipe, load_recipe

__all__ = ["TrainRecipe", "load_recipe"]
