"""Score long (chunk-by-chunk) ShapesWorld clips per chunk: the drift curve, the seam ratio and prompt switches.

A long clip wraps around the frame (vdiff.data.shapes_long), so a window of frames is first rolled to put the
object away from the edges (the circular centroid of its first frame moved to the centre; a roll is exact on a
wrapped world), then read by the short-clip evaluator (vdiff.eval.shapes_eval.read_clip). Chunk c is read from the
`window` frames that end with it (the first `window` frames for the first chunks): colour, shape and the direction
of its recent motion.

    seam ratio = mean |frame t+1 - frame t| across chunk boundaries / the same within chunks
    (1 = no visible seam between chunks; a model that restarts the object at each chunk scores far above 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vdiff.data.shapes import parse_caption
from vdiff.eval.shapes_eval import read_clip

DEFAULT_WINDOW = 8  # frames per reading: the object moves ~4 px over it at ShapesWorld's speed on 16 x 16
SWITCH_FRAMES = 6  # frames read from a prompt switch on: the evaluator needs >= 10% of the frame of motion


def _centre(frame_HW3: np.ndarray, axis: int) -> float:
    """Circular centroid of the frame's brightness along `axis` (0 = rows, 1 = columns), modulo the frame."""
    mass = frame_HW3.max(-1).astype(np.float64)
    n = mass.shape[axis]
    profile = mass.sum(axis=1 - axis)
    angles = 2 * np.pi * (np.arange(n) + 0.5) / n
    z = (profile * np.exp(1j * angles)).sum()
    return float(np.angle(z) % (2 * np.pi) * n / (2 * np.pi)) if abs(z) > 0 else n / 2


def centred_window(frames_THW3: np.ndarray) -> np.ndarray:
    """The frames rolled (both axes) so the object of the first frame sits at the centre."""
    h, w = frames_THW3.shape[1:3]
    dy = int(round(h / 2 - _centre(frames_THW3[0], 0)))
    dx = int(round(w / 2 - _centre(frames_THW3[0], 1)))
    return np.roll(frames_THW3, (dy, dx), axis=(1, 2))


def seam_ratio(frames_THW3: np.ndarray, frames_per_chunk: int) -> float:
    """Mean absolute frame-to-frame change across chunk boundaries over the mean change within chunks."""
    diffs = np.abs(np.diff(frames_THW3.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # (T-1,)
    boundary = (np.arange(1, len(frames_THW3)) % frames_per_chunk) == 0  # the change into a chunk's first frame
    inside = diffs[~boundary].mean()
    return float(diffs[boundary].mean() / inside) if inside > 0 else float("inf")


def read_chunks(frames_THW3: np.ndarray, frames_per_chunk: int, window: int = DEFAULT_WINDOW) -> list[tuple]:
    """Per chunk: (colour, shape, direction) read from the `window` frames ending with it."""
    t = len(frames_THW3)
    out = []
    for c in range(t // frames_per_chunk):
        end = max((c + 1) * frames_per_chunk, min(window, t))
        reading = read_clip(centred_window(frames_THW3[max(0, end - window):end]))
        out.append((reading.colour, reading.shape, reading.direction))
    return out


def read_switch(frames_THW3: np.ndarray, switch_at: int, frames_per_chunk: int) -> tuple:
    """(colour, shape, direction) read from the SWITCH_FRAMES frames from chunk `switch_at` on."""
    start = switch_at * frames_per_chunk
    reading = read_clip(centred_window(frames_THW3[start:start + SWITCH_FRAMES]))
    return reading.colour, reading.shape, reading.direction


def score_long_clip(frames_THW3: np.ndarray, prompts: Sequence[str], frames_per_chunk: int,
                    window: int = DEFAULT_WINDOW, switch_at: int | None = None) -> dict:
    """Per chunk c, the reading against prompts[c] (the prompt in force for that chunk): colour / shape /
    direction / all-correct flags, and the clip's seam ratio. With `switch_at` (the chunk where the prompt changed):
    whether the SWITCH_FRAMES frames from the switch on read as the new prompt."""
    readings = read_chunks(frames_THW3, frames_per_chunk, window)
    if len(prompts) != len(readings):
        raise ValueError(f"score_long_clip: {len(prompts)} prompts for {len(readings)} chunks")
    rows = []
    for (colour, shape, direction), prompt in zip(readings, prompts):
        want = parse_caption(prompt)
        flags = (colour == want[0], shape == want[1], direction == want[2])
        rows.append({"colour": flags[0], "shape": flags[1], "direction": flags[2], "all_correct": all(flags),
                     "read": [colour, shape, direction]})
    out = {"chunks": rows, "seam_ratio": seam_ratio(frames_THW3, frames_per_chunk)}
    if switch_at is not None:
        out["switch_followed"] = read_switch(frames_THW3, switch_at, frames_per_chunk) == parse_caption(
            prompts[switch_at])
    return out


def summarize_long(scores: list[dict]) -> dict:
    """Over clips: per-chunk accuracy (the drift curve), averages, first-4 / last-4 all-correct, mean seam ratio,
    and where clips had a prompt switch, the share that followed it within one chunk (colour and shape kept)."""
    n = len(scores[0]["chunks"])
    per_chunk = []
    for c in range(n):
        rows = [s["chunks"][c] for s in scores]
        per_chunk.append({k: float(np.mean([r[k] for r in rows])) for k in ("colour", "shape", "direction",
                                                                           "all_correct")})
    allc = [p["all_correct"] for p in per_chunk]
    out = {"per_chunk": per_chunk, "all_correct": float(np.mean(allc)),
           "first4_all_correct": float(np.mean(allc[:4])), "last4_all_correct": float(np.mean(allc[-4:])),
           "seam_ratio": float(np.mean([s["seam_ratio"] for s in scores]))}
    switched = [s["switch_followed"] for s in scores if "switch_followed" in s]
    if switched:
        out["switch_followed"] = float(np.mean(switched))
    return out
