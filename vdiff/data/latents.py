"""Precomputed latents + text embeddings on disk, so epochs after the first skip the VAE and the text encoder.

    folder/meta.json          {"fingerprint": {...}, "num_items": N}  (written last: its presence means complete)
    folder/item-00000012.pt   {"latents": [C, F, H, W], "text": [S, dim], "caption": str}

`build_latent_cache` fills the folder (each rank its share, i % world == rank) and is a no-op when the folder
already holds a complete cache with the same fingerprint (`latent_cache_fingerprint`: dataset, VAE and text-encoder
settings); a different fingerprint is an error rather than a silent reuse of stale latents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

META = "meta.json"


def item_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"item-{index:08d}.pt"


def save_item(folder: str | Path, index: int, latents: torch.Tensor, text: torch.Tensor, caption: str,
              writer: str = "0") -> Path:
    """Write one item through a temporary file and a rename, so a reader never sees half of one. `writer` names the
    temporary file, so that processes filling the same folder never share one."""
    path = item_path(folder, index)
    tmp = path.with_suffix(f".tmp{writer}")
    torch.save({"latents": latents.float().cpu().clone(), "text": text.float().cpu().clone(), "caption": caption}, tmp)
    tmp.rename(path)
    return path


def latent_cache_fingerprint(data: dict[str, Any], *, vae: str, in_channels: int, text_encoder: str,
                             text_max_length: int) -> dict[str, Any]:
    """What a cache is built from: the dataset settings (`data`, a plain dict of the recipe's `data:` section), the
    VAE, its latent channels and the text encoder. Written to meta.json and compared on every later open.

    Where the cache lives and how many loader workers read it do not change a latent, so they are blanked. Keys that
    came after the first caches were written are left out at their default, so those caches stay valid:
    `position_jitter` (default 1), `boundary` (default "stop"), `switch_prob` (default 0, and then `switch_every`
    does not matter), `motion_jitter` (default None), `turn` (default "carry"; without switches it does not
    matter)."""
    data_key = dict(data) | {"latent_cache": None, "num_workers": None}
    for key, default in (("position_jitter", 1.0), ("boundary", "stop"), ("switch_prob", 0.0), ("motion_jitter", None),
                         ("turn", "carry")):
        if data_key.get(key, default) == default:
            data_key.pop(key, None)
    if "switch_prob" not in data_key:
        data_key.pop("switch_every", None)
        data_key.pop("turn", None)
    return {"data": data_key, "vae": vae, "in_channels": in_channels, "text_encoder": text_encoder,
            "text_max_length": text_max_length}


def cache_is_complete(folder: str | Path, fingerprint: dict[str, Any]) -> bool:
    """True if `folder` holds a finished cache for `fingerprint`; raises if it holds one for something else."""
    meta = Path(folder) / META
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    if saved.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise ValueError(f"{folder}: latent cache was built for {saved.get('fingerprint')}, not {fingerprint}; "
                         f"delete it or point data.latent_cache elsewhere")
    return True


@torch.no_grad()
def build_latent_cache(
    dataset: torch.utils.data.Dataset,
    folder: str | Path,
    encode_video: Callable[[torch.Tensor], torch.Tensor],  # (B, 3, F, H, W) -> (B, C, F', H', W')
    encode_text: Callable[[list[str]], torch.Tensor],  # prompts -> (B, S, dim)
    fingerprint: dict[str, Any],
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 8,
    barrier: Callable[[], None] = lambda: None,
    show_progress: bool = True,
) -> Path:
    """Encode every item of `dataset` into `folder` (skipping items already there), then write meta.json."""
    folder = Path(folder)
    if cache_is_complete(folder, fingerprint):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(len(dataset)) if i % world == rank and not item_path(folder, i).is_file()]
    bar = tqdm(total=len(mine), desc=f"latent cache (rank {rank})", disable=not show_progress, unit="clip")
    for start in range(0, len(mine), batch_size):
        items = [dataset[i] for i in mine[start:start + batch_size]]
        latents = encode_video(torch.stack([it["video"] for it in items]))  # (B, C, F', H', W')
        text = encode_text([it["caption"] for it in items])  # (B, S, dim)
        for it, z, t in zip(items, latents, text):
            save_item(folder, it["index"], z, t, it["caption"], writer=str(rank))  # z (C, F', H', W'), t (S, dim)
        bar.update(len(items))
    bar.close()
    barrier()
    if rank == 0:
        missing = [i for i in range(len(dataset)) if not item_path(folder, i).is_file()]
        if missing:
            raise RuntimeError(f"{folder}: latent cache is missing {len(missing)} items (e.g. {missing[:5]})")
        (folder / META).write_text(json.dumps({"fingerprint": fingerprint, "num_items": len(dataset)}, indent=2))
    barrier()
    return folder


class LatentDataset(torch.utils.data.Dataset):
    """Items of a finished cache: `{"latents": [C, F, H, W], "text": [S, dim], "caption": str, "index": i}`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = self.folder / META
        if not meta.is_file():
            raise FileNotFoundError(f"{self.folder}: no finished latent cache ({META} missing)")
        self.num_items = int(json.loads(meta.read_text())["num_items"])

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict:
        item = torch.load(item_path(self.folder, int(index)), map_location="cpu", weights_only=True)
        return {**item, "index": int(index)}
