"""What the trainer reads: the frozen encoders, the dataset (ShapesWorld, a video folder, or a latent cache of either),
the data order, and the per-sample random generators.

Exactness rests on two choices made here:
- the data order is a pure function of (seed, epoch), cut by data-parallel rank in the sampler (not by
  `accelerator.prepare`: under DeepSpeed on CPU it did not shard), and it can start at any micro-batch (resume);
- each sample's noise, noise level and caption dropout come from a generator seeded by (seed, step, sample index),
  never from a global RNG stream, so they do not depend on the process count, the batch split or a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from train.config import DataConfig, TrainRecipe
from vdiff.config import ConfigError, ModelConfig, to_dict
from vdiff.data.latents import LatentDataset, build_latent_cache, item_path, latent_cache_fingerprint, save_item

# --------------------------------------------------------------------------------------------------------------------
# Data order and per-sample randomness
# --------------------------------------------------------------------------------------------------------------------


class ShardedBatchSampler:
    """Endless micro-batches of indices. Epoch e is a permutation of seed+e; micro-batch j of the run takes slice
    (j % per_epoch) * dp_world + dp_rank of that permutation, so data-parallel ranks read disjoint samples and the
    union over ranks of micro-batch j is the same global batch whatever the rank count. `start` skips j < start."""

    def __init__(self, num_items: int, batch_size: int, dp_rank: int, dp_world: int, seed: int, start: int = 0):
        self.num_items, self.batch_size, self.dp_rank, self.dp_world = num_items, batch_size, dp_rank, dp_world
        self.seed, self.start = seed, start
        self.per_epoch = num_items // (batch_size * dp_world)
        if self.per_epoch < 1:
            raise ConfigError(f"data: {num_items} samples cannot fill one global micro-batch of "
                              f"train.batch_size={batch_size} x {dp_world} data-parallel ranks")

    def indices(self, j: int) -> list[int]:
        epoch, k = divmod(j, self.per_epoch)
        perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        offset = (k * self.dp_world + self.dp_rank) * self.batch_size
        return perm[offset:offset + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        j = self.start
        while True:
            yield self.indices(j)
            j += 1


def collate(items: list[dict]) -> dict[str, Any]:
    """Stack tensors along a new batch dimension; keep everything else (captions, indices) as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def batches(dataset: torch.utils.data.Dataset, batch_size: int, dp_rank: int, dp_world: int, seed: int,
            start: int = 0, num_workers: int = 0) -> Iterator[dict[str, Any]]:
    """Endless collated micro-batches for this data-parallel rank, from micro-batch `start` of the run on."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, dp_rank, dp_world, seed=seed, start=start)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                            num_workers=num_workers))


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one sample's noise at one step: independent of ranks, batch split and resume."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------------------------------------------------
# Frozen encoders: clips -> latents, captions -> token embeddings
# --------------------------------------------------------------------------------------------------------------------


def build_encoders(recipe: TrainRecipe, model_config: ModelConfig, device: torch.device | str) -> tuple[Any, Any]:
    """(text encoder, VAE) of the recipe, checked against the model: latent channels, text width and clip size must
    fit, so a mismatch is a config error now rather than a shape error at the first step."""
    from vdiff.models.text import HFTextEncoder, minilm_text_encoder
    from vdiff.models.vae import PixelPatchVAE, load_vae

    if recipe.text_encoder == "minilm":
        text = minilm_text_encoder(recipe.text_max_length)
    else:
        text = HFTextEncoder.from_pretrained(recipe.text_encoder, recipe.text_max_length)
    text.to(device)
    if recipe.vae == "pixel":
        try:
            vae = PixelPatchVAE.for_channels(model_config.in_channels)
        except ValueError:
            raise ConfigError(f"vae=pixel needs model.in_channels = 3*k*k (got {model_config.in_channels})") from None
    else:
        vae = load_vae(recipe.vae).to(device)
    if vae.latent_channels != model_config.in_channels:
        raise ConfigError(f"vae has {vae.latent_channels} latent channels, model.in_channels="
                          f"{model_config.in_channels}")
    if text.dim != model_config.text_dim:
        raise ConfigError(f"text encoder is {text.dim}-d, model.text_dim={model_config.text_dim}")
    d = recipe.data
    msg = vae.check_size(d.num_frames, d.height, d.width)
    if msg:
        raise ConfigError(f"data: {msg}")
    return text, vae


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def clip_dataset(data: DataConfig) -> torch.utils.data.Dataset:
    """The clips themselves (items `{"video": [3, F, H, W], "caption": str, "index": i}`), before any cache."""
    if data.dataset == "shapes":
        return data.shapes_world()
    from vdiff.data.video_folder import VideoFolder

    return VideoFolder(data.root, num_frames=data.num_frames, height=data.height, width=data.width,
                       frame_stride=data.frame_stride)


def cache_fingerprint(recipe: TrainRecipe, in_channels: int) -> dict[str, Any]:
    """The latent-cache fingerprint (`vdiff.data.latents.latent_cache_fingerprint`) of a recipe's data and encoders."""
    return latent_cache_fingerprint(to_dict(recipe.data), vae=recipe.vae, in_channels=in_channels,
                                    text_encoder=recipe.text_encoder, text_max_length=recipe.text_max_length)


def build_dataset(recipe: TrainRecipe, in_channels: int, encode_video: Callable[[torch.Tensor], torch.Tensor],
                  encode_text: Callable[[list[str]], torch.Tensor], accelerator: Any) -> torch.utils.data.Dataset:
    """The training dataset: the clips, or with data.latent_cache their latents + text embeddings, filled first by
    all ranks together (each its share) when the cache is not complete yet."""
    dataset = clip_dataset(recipe.data)
    if recipe.data.latent_cache is None:
        return dataset
    build_latent_cache(
        dataset, recipe.data.latent_cache, encode_video, encode_text, cache_fingerprint(recipe, in_channels),
        rank=accelerator.process_index, world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
        show_progress=accelerator.is_local_main_process)
    return LatentDataset(recipe.data.latent_cache)


@torch.no_grad()
def fill_shapes_cache(recipe: TrainRecipe) -> Path:
    """`python -m train cache`: fill a ShapesWorld latent cache in one process, fast. The grammar has 72 captions,
    so each is text-encoded once and reused. The items are the ones the trainer would write (PixelPatchVAE is an
    exact space-to-depth and MiniLM pads every caption to text_max_length, so neither depends on its batch); then
    `build_latent_cache` finds them all, checks none is missing and writes meta.json with the trainer's fingerprint,
    so the cache is readable before any run has touched it."""
    from vdiff.models.text import minilm_text_encoder
    from vdiff.models.vae import PixelPatchVAE

    d = recipe.data
    if d.dataset != "shapes" or not d.latent_cache or recipe.text_encoder != "minilm" or recipe.vae != "pixel":
        raise ConfigError("train cache needs data.dataset=shapes, data.latent_cache set, text_encoder=minilm, "
                          "vae=pixel")
    dataset = d.shapes_world()
    in_channels = recipe.model.to_model_config().in_channels
    vae = PixelPatchVAE.for_channels(in_channels)
    text = minilm_text_encoder(recipe.text_max_length)
    folder = Path(d.latent_cache)
    folder.mkdir(parents=True, exist_ok=True)
    embeds: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(dataset)), desc="cache", unit="clip"):
        if item_path(folder, i).is_file():
            continue
        item = dataset[i]
        cap = item["caption"]
        if cap not in embeds:
            embeds[cap] = text.encode([cap]).embeds[0]  # (S, dim)
        save_item(folder, i, vae.encode(item["video"][None])[0], embeds[cap], cap, writer="fill")  # (C, F, H, W)
    # Every item is present now, so this only checks that and writes meta.json (it never calls the encoders).
    build_latent_cache(dataset, folder, vae.encode, lambda caps: text.encode(caps).embeds,
                       cache_fingerprint(recipe, in_channels), show_progress=False)
    return folder
