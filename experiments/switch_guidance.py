"""Does switch guidance make a causal ShapesWorld model follow a prompt switch? Scale and length against the eval.

    python -m experiments.switch_guidance --checkpoint checkpoints/shapes-causal --settings 1:1,2:3,3:3 [--seed 0]

Each setting G:K streams the long eval's switched clips (vdiff.eval.long_run: the first quarter of its prompts,
switched at chunk --switch-at to the turned direction, one by one, noise seed --seed) with
`switch_guidance=G, switch_guidance_chunks=K` up to 3 chunks past the switch, and scores them as the eval does
(vdiff.eval.long_eval): the switch reading (the 6 frames from the switch on: colour, shape and direction against
the new prompt), what in it is wrong, and chunk switch+1's reading (the 8 frames ending with it). --no-switch
streams the same clips without a switch and reads the same frames against the first prompt: how often the reading
itself fails on frames with no turn. G = 1 is the eval's own number at switch guidance off. What it measured:
docs/long-video.md (switch guidance).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np


def parse_settings(text: str) -> list[tuple[float, int]]:
    """'1:1,2:3' -> [(1.0, 1), (2.0, 3)] (switch guidance scale : chunks)."""
    out = []
    for item in text.split(","):
        g, _, k = item.partition(":")
        try:
            out.append((float(g), int(k or 3)))
        except ValueError:
            raise ValueError(f"--settings: expected G:K items like 2:3, got {item!r}") from None
    return out


def probe(pipe: Any, prompts: list[str], guidance: float, chunks: int, *, seed: int = 0, switch_at: int = 8,
          switch: bool = True) -> dict[str, Any]:
    """Stream `prompts` one by one (switch at `switch_at` to the eval's turned direction unless `switch` is off) and
    score the switch reading as the long eval does. Returns counts over the clips and the per-clip flags."""
    from vdiff.data.shapes import caption, parse_caption
    from vdiff.eval.long_eval import read_switch, score_long_clip
    from vdiff.eval.long_run import TURN

    per = pipe.chunk_pixel_frames
    n = switch_at + 3
    followed, wrong, after = [], np.zeros(3, dtype=int), np.zeros(3, dtype=int)
    for p in prompts:
        colour, shape, direction = parse_caption(p)
        q = caption(colour, shape, TURN[direction]) if switch else p
        stream = pipe.stream([p], num_chunks=n, seed=seed, prompts={switch_at: q} if switch else None,
                             switch_guidance=guidance, switch_guidance_chunks=chunks)
        clip = np.concatenate([c.videos for c in stream], axis=1)[0]
        score = score_long_clip(clip, [p] * switch_at + [q] * (n - switch_at), per, switch_at=switch_at)
        followed.append(bool(score["switch_followed"]))
        wrong += [a != b for a, b in zip(read_switch(clip, switch_at, per), parse_caption(q))]
        row = score["chunks"][switch_at + 1]
        after += [row["colour"], row["shape"], row["direction"]]
    return {"clips": len(prompts), "followed": int(sum(followed)), "per_clip": followed,
            "wrong": dict(zip(("colour", "shape", "direction"), wrong.tolist())),
            "next_chunk": dict(zip(("colour", "shape", "direction"), after.tolist()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/shapes-causal")
    ap.add_argument("--settings", default="1:1,2:3", help="switch guidance G:K items (scale : chunks), comma-separated")
    ap.add_argument("--seed", type=int, default=0, help="eval seed: prompt order and noise (default 0)")
    ap.add_argument("--clips", type=int, default=36, help="switched clips (the eval's: a quarter of 144)")
    ap.add_argument("--switch-at", type=int, default=8)
    ap.add_argument("--no-switch", action="store_true", help="the same clips without a switch (the reading's floor)")
    args = ap.parse_args(argv)

    from vdiff.eval.run import eval_prompts
    from vdiff.pipeline import VideoPipeline

    pipe = VideoPipeline.from_pretrained(args.checkpoint)
    prompts = eval_prompts(4 * args.clips, args.seed)[:args.clips]
    for g, k in parse_settings(args.settings):
        t0 = time.perf_counter()
        res = probe(pipe, prompts, g, k, seed=args.seed, switch_at=args.switch_at, switch=not args.no_switch)
        nxt, c = res["next_chunk"], res["clips"]
        print(f"switch_guidance={g} chunks={k}{' (no switch)' if args.no_switch else ''}: followed "
              f"{res['followed']}/{c}; switch reading wrong: colour {res['wrong']['colour']}, shape "
              f"{res['wrong']['shape']}, direction {res['wrong']['direction']}; chunk {args.switch_at + 1}: direction "
              f"{nxt['direction']}/{c}, shape {nxt['shape']}/{c} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
