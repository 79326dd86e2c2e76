"""Fill a ShapesWorld latent cache fast: the grammar has only 72 captions, so each is text-encoded once.

    python scripts/fill_shapes_cache.py --config configs/train/shapes_tiny.yaml

Writes the same item files as `vdiff.data.latents.build_latent_cache` (latents, text, caption) for every item of the
recipe's dataset that is missing, then hands the folder to `build_latent_cache` itself, which finds every item
present, checks nothing is missing and writes meta.json with the trainer's fingerprint: the cache is then readable
by `LatentDataset` (scripts/direction_learnability.py) before any training run has touched it. Per-item encoding is
what the trainer would do (PixelPatchVAE is exact space-to-depth and MiniLM pads every caption to text_max_length,
so an embedding does not depend on its batch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()

    from train.config import load_recipe
    from train.trainer import latent_cache_fingerprint
    from vdiff.data.latents import _item_path, build_latent_cache
    from vdiff.models.text import minilm_text_encoder
    from vdiff.models.vae import PixelPatchVAE

    rc = load_recipe(args.config, args.overrides)
    d = rc.data
    if d.dataset != "shapes" or not d.latent_cache or rc.text_encoder != "minilm" or rc.vae != "pixel":
        raise SystemExit("needs data.dataset=shapes, data.latent_cache set, text_encoder=minilm, vae=pixel")
    ds = d.shapes_world()
    in_channels = rc.model.to_model_config().in_channels
    vae = PixelPatchVAE.for_channels(in_channels)
    text = minilm_text_encoder(rc.text_max_length)
    folder = Path(d.latent_cache)
    folder.mkdir(parents=True, exist_ok=True)
    emb: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in tqdm(range(len(ds)), desc="cache", unit="clip"):
            path = _item_path(folder, i)
            if path.is_file():
                continue
            item = ds[i]
            cap = item["caption"]
            if cap not in emb:
                emb[cap] = text.encode([cap]).embeds[0].float().clone()  # (S, dim)
            z = vae.encode(item["video"][None])[0].float().clone()  # (C, F, H, W)
            tmp = path.with_suffix(".tmpfill")
            torch.save({"latents": z, "text": emb[cap], "caption": cap}, tmp)
            tmp.rename(path)
    # Every item is present now, so this only checks that and writes meta.json (it never calls the encoders).
    build_latent_cache(ds, folder, vae.encode, lambda caps: text.encode(caps).embeds,
                       latent_cache_fingerprint(rc, in_channels), show_progress=False)
    print(f"{folder}: {len(ds)} items, meta.json written")


if __name__ == "__main__":
    main()
