"""Precomputed latents + text embeddings on disk, so epochs after the first skip the VAE and the text encoder.

    folder/meta.json          {"fingerprint": {...}, "num_items": N}  (written last: its presence means complete)
    folder/item-00000012.pt   {"latents": [C, F, H, W], "text": [S, dim], "caption": str}

`build_latent_cache` fills the folder (each rank its share, i % world == rank) and is a no-op when the folder
already holds a complete cache with the same fingerprint (dataset, VAE and text-encoder settings); a different
fingerprint is an error rather than a silent reuse of stale latents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

META = "meta.json"


def _item_path(folder: Path, index: int) -> Path:
    return folder / f"item-{index:08d}.pt"


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
    mine = [i for i in range(len(dataset)) if i % world == rank and not _item_path(folder, i).is_file()]
    bar = tqdm(total=len(mine), desc=f"latent cache (rank {rank})", disable=not show_progress, unit="clip")
    for start in range(0, len(mine), batch_size):
        items = [dataset[i] for i in mine[start:start + batch_size]]
        latents = encode_video(torch.stack([it["video"] for it in items]))  # (B, C, F', H', W')
        text = encode_text([it["caption"] for it in items])  # (B, S, dim)
        for it, z, t in zip(items, latents, text):
            path = _item_path(folder, it["index"])
            tmp = path.with_suffix(f".tmp{rank}")
            torch.save({"latents": z.float().cpu().clone(), "text": t.float().cpu().clone(), "caption": it["caption"]},
                       tmp)
            tmp.rename(path)  # atomic: a half-written item is never read
        bar.update(len(items))
    bar.close()
    barrier()
    if rank == 0:
        missing = [i for i in range(len(dataset)) if not _item_path(folder, i).is_file()]
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
        item = torch.load(_item_path(self.folder, int(index)), map_location="cpu", weights_only=True)
        return {**item, "index": int(index)}
