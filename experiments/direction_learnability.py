"""Why the bundled model ignores "moving left/right": a two-arm experiment at the highest noise level.

    python -m experiments.direction_learnability [--steps 300] [--batch 16] [--arms mean,sample] [key=value ...]

At s = 1 the model sees no signal, so the best prediction is the caption's mean clip E[x0 | caption]; its
direction-dependent part is what makes a sampler put the object on the right path. Both arms train the recipe's
model (configs/train/shapes_tiny.yaml's, fresh weights, same seed, AdamW 1e-3) at t = 1000 from a zero input:

- "mean": the target is the caption's mean latent over the cached dataset (what the loss converges to, without
  the per-clip scatter of the start position);
- "sample": the target is one clip per draw, as in real training (same expected gradient, much more variance).

Every 50 steps it prints the mean absolute difference between the model's predictions for "a red square moving
left" and "... right", next to the same difference between the data's own mean clips. If "mean" learns it and
"sample" does not, the model can represent the layout and the per-clip scatter of the target is what hides it.

It reads the recipe's latent cache (data.latent_cache; fill it first with `python -m train cache --config RECIPE
[key=value ...]` and the same overrides). What it measured, and what the bundled recipe took from it:
experiments/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.direction_learnability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train/shapes_tiny.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--arms", default="mean,sample")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides (e.g. data.position_jitter=0.3 data.latent_cache=DIR)")
    args = p.parse_intermixed_args(argv)

    from train.config import load_recipe
    from vdiff.data.latents import LatentDataset
    from vdiff.models.dit import VideoDiT

    rc = load_recipe(args.config, args.overrides)
    if not rc.data.latent_cache:
        raise SystemExit("needs data.latent_cache (fill it: python -m train cache --config ...)")
    ds = LatentDataset(rc.data.latent_cache)
    items = [ds[i] for i in range(len(ds))]
    caps = sorted({it["caption"] for it in items})
    index = {c: i for i, c in enumerate(caps)}
    sums = torch.zeros(len(caps), *items[0]["latents"].shape)
    counts = torch.zeros(len(caps))
    texts = {}
    for it in items:
        sums[index[it["caption"]]] += it["latents"]
        counts[index[it["caption"]]] += 1
        texts[it["caption"]] = it["text"]
    means = sums / counts.view(-1, *[1] * (sums.ndim - 1))
    left, right = "a red square moving left", "a red square moving right"
    gap = (means[index[left]] - means[index[right]]).abs().mean()
    print(f"data: mean clips of {left!r} and {right!r} differ by {gap:.4f}")

    for arm in args.arms.split(","):
        torch.manual_seed(0)
        model = VideoDiT.from_model_config(rc.model.to_model_config())
        opt = torch.optim.AdamW(model.parameters(), lr=rc.optim.lr, weight_decay=0)
        g = torch.Generator().manual_seed(0)
        t0 = time.time()
        for step in range(1, args.steps + 1):
            idx = torch.randint(len(items), (args.batch,), generator=g)
            text = torch.stack([items[i]["text"] for i in idx])
            if arm == "mean":
                x0 = torch.stack([means[index[items[i]["caption"]]] for i in idx])
            else:
                x0 = torch.stack([items[i]["latents"] for i in idx])
            zero = torch.zeros_like(x0)
            v = model(zero, torch.full((args.batch,), 1000.0), text, return_dict=False)[0]
            loss = (v + x0).square().mean()  # v = noise - x0 with noise = 0
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), rc.train.grad_clip)
            opt.step()
            if step % 50 == 0:
                with torch.no_grad():
                    pair = torch.stack([texts[left], texts[right]])
                    o = -model(torch.zeros(2, *x0.shape[1:]), torch.full((2,), 1000.0), pair, return_dict=False)[0]
                print(f"{arm:6} step {step:4}  loss {loss.item():.4f}  left/right {(o[0] - o[1]).abs().mean():.4f}  "
                      f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
