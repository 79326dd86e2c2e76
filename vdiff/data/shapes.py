"""ShapesWorld: short captioned videos whose answers are known.

The rules of the world (the evaluator in `vdiff.eval.shapes_eval` reads them back out of any clip):

- A clip is `num_frames` RGB frames (default 16 x 32 x 32), uint8, on a black background.
- It shows exactly one solid, flat-coloured shape: a circle, an axis-aligned square, or an isosceles triangle
  with its apex pointing up (base at the bottom). The shape never rotates, scales or changes colour.
- Colours are pure palette colours (`COLOURS`): red, green, blue, yellow, magenta, white; every one has a
  brightest channel of 255, so "bright" means foreground whatever the hue.
- The object is `size` x `size` pixels with `size = 0.25 * min(H, W)` by default (a quarter of the frame).
- It moves in a straight line at constant speed, left, right, up or down (image coordinates: up = towards row 0),
  travelling `speed = 0.5` of the frame's extent along that axis from the first to the last frame.
- The start position is drawn from the seed, uniformly over the positions that keep the whole object inside the
  frame on every frame; sub-pixel positions are rendered with 4x4 supersampled anti-aliasing. `position_jitter`
  (default 1) narrows that range around its centre: 0 puts every clip of a caption on the same centred path.
- The caption is "a {colour} {shape} moving {direction}" (`caption`); 6 x 3 x 4 = 72 combinations.
- `HELD_OUT` lists 6 combinations never used for training (`split="train"`), so a model can be tested on new
  combinations of known words. Every single word and every *pair* of words (colour-shape, colour-direction,
  shape-direction) still appears in training; only the triples are new.
- Everything is deterministic by seed: the same arguments give the same bytes on any machine or worker.

Harder variants (off by default, captions unchanged, still evaluable): `background="noise"|"gradient"` adds a
dim (< 25% brightness) static background; `distractors=N` adds N small (half-size), dim grey static squares
placed clear of the object's path.

    from vdiff.data.shapes import ShapesWorld, render_clip, caption, parse_caption, HELD_OUT
    frames = render_clip("red", "circle", "left", seed=0)  # uint8 [16, 32, 32, 3]
    ds = ShapesWorld(1024, seed=0, split="train")  # ds[i]: {"video": [3,T,H,W] in [-1,1], "caption", "index"}
    (colour, shape, direction), render_seed = ds.spec(5)
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# Grammar
# ----------------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion per direction as (dx, dy) in image coordinates (y grows downwards).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

Combination = tuple[str, str, str]  # (colour, shape, direction)

# Held out of training for compositional generalisation. Chosen so that each colour is held out once, each shape
# twice, and no colour-shape, colour-direction or shape-direction pair repeats: every pair of words is still
# seen in training, only these 6 triples are new.
HELD_OUT: tuple[Combination, ...] = (
    ("red", "circle", "left"),
    ("green", "square", "right"),
    ("blue", "triangle", "up"),
    ("yellow", "circle", "down"),
    ("magenta", "triangle", "left"),
    ("white", "square", "up"),
)

SPLITS = ("train", "heldout", "all")
BACKGROUNDS = (None, "noise", "gradient")
TURNS = ("carry", "crisp")  # wrap clips that switch: a new segment's first frame placed by the old motion or its own
DEFAULT_SIZE = 0.25  # object side as a fraction of min(H, W)
DEFAULT_SPEED = 0.5  # distance travelled over the clip as a fraction of the frame along the motion axis
MIN_SIDE_PX = 4  # below this a circle, square and triangle are a few indistinguishable pixels
DISTRACTOR_GREY = 72  # dim enough to sit below the evaluator's foreground threshold (half the brightest pixel)

_CAPTION_RE = re.compile(r"^\s*an?\s+(\S+)\s+(\S+)\s+moving\s+(\S+?)\s*\.?\s*$", re.IGNORECASE)


def caption(colour: str, shape: str, direction: str) -> str:
    """The caption of a combination: "a {colour} {shape} moving {direction}"."""
    _check_combination(colour, shape, direction)
    return f"a {colour} {shape} moving {direction}"


def parse_caption(text: str) -> Combination:
    """Inverse of `caption`: "a red circle moving left" -> ("red", "circle", "left").

    Case and surrounding whitespace / a trailing full stop are ignored. Raises ValueError naming what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a str, got {type(text).__name__}")
    m = _CAPTION_RE.match(text)
    if m is None:
        raise ValueError(f"caption {text!r} does not match 'a {{colour}} {{shape}} moving {{direction}}'")
    colour, shape, direction = (g.lower() for g in m.groups())
    _check_combination(colour, shape, direction, where=f" in caption {text!r}")
    return colour, shape, direction


def all_combinations() -> list[Combination]:
    """All 72 (colour, shape, direction) triples in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def train_combinations() -> list[Combination]:
    """The 66 combinations used for training: `all_combinations()` minus `HELD_OUT`."""
    held = set(HELD_OUT)
    return [c for c in all_combinations() if c not in held]


def split_combinations(split: str) -> list[Combination]:
    """Combinations of a split: "train" (66), "heldout" (6) or "all" (72)."""
    if split == "train":
        return train_combinations()
    if split == "heldout":
        return list(HELD_OUT)
    if split == "all":
        return all_combinations()
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def is_held_out(colour: str, shape: str, direction: str) -> bool:
    return (colour, shape, direction) in set(HELD_OUT)


def _check_combination(colour: str, shape: str, direction: str, where: str = "") -> None:
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {list(COLOURS)}, got {colour!r}{where}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}{where}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}{where}")


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4


def shape_coverage(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` centred on its bounding box centre (cx, cy) -> float32 [H, W].

    Pixel (r, c) covers [c, c+1) x [r, r+1); `side` is the bounding-box side in pixels.
    """
    s = _SUPERSAMPLE
    ys = (np.arange(height * s, dtype=np.float64) + 0.5) / s  # sample centres in pixel units
    xs = (np.arange(width * s, dtype=np.float64) + 0.5) / s
    y, x = ys[:, None], xs[None, :]
    half = side / 2.0
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # Apex at (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half).
        frac = (y - (cy - half)) / side  # 0 at the apex row, 1 at the base
        inside = (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= frac * half)
    else:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")
    cov = inside.reshape(height, s, width, s).mean(axis=(1, 3))  # (H, W)
    return cov.astype(np.float32)


def start_range(direction: str, side: float, travel: float, height: int, width: int) -> tuple[tuple, tuple]:
    """Allowed ((x_lo, x_hi), (y_lo, y_hi)) of the object's first-frame centre so it stays inside the frame."""
    dx, dy = DIRECTION_VECTORS[direction]
    half = side / 2.0
    x_lo, x_hi = half, width - half
    y_lo, y_hi = half, height - half
    if dx > 0:
        x_hi -= travel
    elif dx < 0:
        x_lo += travel
    if dy > 0:
        y_hi -= travel
    elif dy < 0:
        y_lo += travel
    return (x_lo, x_hi), (y_lo, y_hi)


def _narrow(lo: float, hi: float, fraction: float) -> tuple[float, float]:
    """The middle `fraction` of [lo, hi]."""
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0 * fraction
    return mid - half, mid + half


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def _check_float(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")


def checked_geometry(height: int, width: int, seed: int, size: float | None, speed: float | None,
                     position_jitter: float | None) -> tuple[float, float, float]:
    """Check a clip's frame size and seed, and return (size, speed, position_jitter) with defaults filled in."""
    _check_int("height", height, 8, 4096)
    _check_int("width", width, 8, 4096)
    _check_int("seed", seed, 0, 2**63 - 1)
    size = DEFAULT_SIZE if size is None else size
    speed = DEFAULT_SPEED if speed is None else speed
    position_jitter = 1.0 if position_jitter is None else position_jitter
    _check_float("size", size, 0.1, 0.5)
    _check_float("position_jitter", position_jitter, 0.0, 1.0)
    _check_float("speed", speed, 0.0, 0.9)
    return size, speed, position_jitter


def render_clip(
    colour: str,
    shape: str,
    direction: str,
    *,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    size: float | None = None,
    speed: float | None = None,
    background: str | None = None,
    distractors: int = 0,
    position_jitter: float | None = None,
) -> np.ndarray:
    """Render one ShapesWorld clip -> np.uint8 [T, H, W, 3].

    size: object side as a fraction of min(H, W) (default 0.25). speed: distance travelled from the first to the
    last frame as a fraction of the frame along the motion axis (default 0.5); the object must fit, so
    speed * extent + size * min(H, W) <= extent. position_jitter in [0, 1] (default 1): the fraction of the allowed
    start range (along and across the motion) the start position is drawn from, centred in it. The start position,
    background texture and distractor positions come from `seed` (same arguments -> same bytes).
    """
    _check_combination(colour, shape, direction)
    _check_int("num_frames", num_frames, 2, 4096)
    _check_int("distractors", distractors, 0, 8)
    size, speed, position_jitter = checked_geometry(height, width, seed, size, speed, position_jitter)
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")

    dx, dy = DIRECTION_VECTORS[direction]
    extent = width if dx else height
    side = size * min(height, width)
    travel = speed * extent
    if side < MIN_SIDE_PX:
        raise ValueError(
            f"size={size} gives a {side:.1f}-pixel object in a {height}x{width} frame; shapes need at least "
            f"{MIN_SIDE_PX} pixels: use size >= {MIN_SIDE_PX / min(height, width):.3f} or a larger frame"
        )
    if travel + side > extent:
        raise ValueError(
            f"speed={speed} with size={size} does not fit a {height}x{width} frame moving {direction}: "
            f"need speed * {extent} + size * {min(height, width)} <= {extent}"
        )

    rng = np.random.default_rng([seed, 0x5A4E5])  # own stream, so ShapesWorld seeds do not alias other RNG uses
    (x_lo, x_hi), (y_lo, y_hi) = start_range(direction, side, travel, height, width)
    if position_jitter < 1.0:
        x_lo, x_hi = _narrow(x_lo, x_hi, position_jitter)
        y_lo, y_hi = _narrow(y_lo, y_hi, position_jitter)
    cx0, cy0 = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)

    base_HW3 = _background(background, height, width, rng)
    if distractors:
        half = side / 2
        x_end, y_end = cx0 + dx * travel, cy0 + dy * travel
        swept = (min(cx0, x_end) - half, min(cy0, y_end) - half, max(cx0, x_end) + half, max(cy0, y_end) + half)
        base_HW3 = _add_distractors(base_HW3, distractors, side, swept, rng)

    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    clip_THW3 = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        p = t / (num_frames - 1)
        cov_HW = shape_coverage(shape, cx0 + dx * travel * p, cy0 + dy * travel * p, side, height, width)
        frame = base_HW3 * (1.0 - cov_HW[..., None]) + rgb * cov_HW[..., None]  # (H, W, 3)
        clip_THW3[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return clip_THW3


def _background(kind: str | None, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Static background, float32 [H, W, 3], max brightness < 64 (a quarter of the object's)."""
    if kind is None:
        return np.zeros((height, width, 3), dtype=np.float32)
    if kind == "noise":
        return rng.uniform(0, 40, size=(height, width, 3)).astype(np.float32)
    # gradient: a random dim colour fading across the frame in a random direction
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(theta) * xx / width + np.sin(theta) * yy / height) % 1.0
    tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    return (ramp[..., None] * tint * 48).astype(np.float32)


def _add_distractors(
    base_HW3: np.ndarray, n: int, side: float, swept: tuple[float, float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """N small dim grey static squares (half the object's side), each at least 1 pixel clear of the box the
    object sweeps (x0, y0, x1, y1) and of each other, so they never touch the object."""
    h, w, _ = base_HW3.shape
    out = base_HW3.copy()
    d_half = side / 4
    boxes = [swept]
    for k in range(n):
        for _attempt in range(1000):
            cx, cy = rng.uniform(d_half, w - d_half), rng.uniform(d_half, h - d_half)
            box = (cx - d_half, cy - d_half, cx + d_half, cy + d_half)
            if all(box[0] > b[2] + 1 or box[2] < b[0] - 1 or box[1] > b[3] + 1 or box[3] < b[1] - 1 for b in boxes):
                break
        else:
            raise ValueError(f"distractors={n}: no room for distractor {k + 1} clear of the object's path; use fewer")
        boxes.append(box)
        cov = shape_coverage("square", cx, cy, 2 * d_half, h, w)[..., None]
        out = out * (1 - cov) + DISTRACTOR_GREY * cov
    return out


# ----------------------------------------------------------------------------------------------------------
# Conversions between the uint8 clip layout and the model's video tensor layout
# ----------------------------------------------------------------------------------------------------------


def clip_to_video(clip_THW3: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 tensor [3, T, H, W] in [-1, 1]."""
    clip_THW3 = np.asarray(clip_THW3)
    if clip_THW3.dtype != np.uint8 or clip_THW3.ndim != 4 or clip_THW3.shape[-1] != 3:
        raise ValueError(f"clip must be uint8 [T, H, W, 3], got {clip_THW3.dtype} {list(clip_THW3.shape)}")
    # numpy, not torch ops: DataLoader workers should not fight over torch's intra-op threads for this
    video_CTHW = np.ascontiguousarray((clip_THW3.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2))
    return torch.from_numpy(video_CTHW)  # (3, T, H, W)


def video_to_clip(video_CTHW: torch.Tensor | np.ndarray) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] (values outside are clipped) -> uint8 [T, H, W, 3]."""
    video_CTHW = torch.as_tensor(video_CTHW)
    if video_CTHW.ndim != 4 or video_CTHW.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W], got {list(video_CTHW.shape)}")
    x = ((video_CTHW.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


class ShapesWorld(torch.utils.data.Dataset):
    """`num_samples` captioned ShapesWorld clips, generated on the fly.

    Item i is a pure function of (seed, i) and the constructor arguments, so it is the same in every worker,
    process and epoch: `{"video": float32 [3, T, H, W] in [-1, 1], "caption": str, "index": i}`.
    split: "train" (all combinations but HELD_OUT), "heldout" (only HELD_OUT) or "all".
    Combinations are drawn uniformly from the split; `spec(i)` tells which one item i is and its render seed.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        seed: int = 0,
        split: str = "train",
        size: float | None = None,
        speed: float | None = None,
        background: str | None = None,
        distractors: int = 0,
        position_jitter: float | None = None,
        boundary: str = "stop",
        switch_prob: float = 0.0,
        switch_every: int = 1,
        motion_jitter: float | None = None,
        turn: str = "carry",
    ) -> None:
        _check_int("num_samples", num_samples, 1, 2**40)
        if boundary not in ("stop", "wrap"):
            raise ValueError(f"boundary must be 'stop' (stay inside the frame) or 'wrap' (vdiff.data.shapes_long), "
                             f"got {boundary!r}")
        if motion_jitter is not None and (boundary != "wrap" or not 0.0 <= motion_jitter <= 1.0):
            raise ValueError(f"motion_jitter (the start spread along the motion axis) needs boundary='wrap' and a "
                             f"value in [0, 1], got {motion_jitter} with boundary={boundary!r}")
        self.motion_jitter = motion_jitter
        if turn not in TURNS:
            raise ValueError(f"turn (where a switched clip's new segment starts) must be 'carry' or 'crisp', got "
                             f"{turn!r}")
        self.turn = turn
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        if switch_prob > 0 and (boundary != "wrap" or num_frames % switch_every or num_frames // switch_every < 2):
            raise ValueError(f"direction switches need boundary='wrap' and num_frames={num_frames} a multiple of "
                             f"switch_every={switch_every} with at least 2 segments")
        self.boundary = boundary
        self.switch_prob, self.switch_every = float(switch_prob), int(switch_every)
        _check_int("seed", seed, 0, 2**63 - 1)
        self.combinations = split_combinations(split)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.split = split
        self.render_kwargs = dict(
            num_frames=num_frames,
            height=height,
            width=width,
            size=size,
            speed=speed,
            background=background,
            distractors=distractors,
            position_jitter=position_jitter,
        )
        # Fail at construction, not inside a DataLoader worker, if the geometry is impossible.
        for direction in DIRECTIONS:
            render_clip("white", "square", direction, **{**self.render_kwargs, "num_frames": 2})

    def __len__(self) -> int:
        return self.num_samples

    def spec(self, index: int) -> tuple[Combination, int]:
        """((colour, shape, direction), render_seed) of item `index`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index must be in [0, {self.num_samples}), got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        combo = self.combinations[int(rng.integers(len(self.combinations)))]
        return combo, int(rng.integers(2**31 - 1))

    def switch(self, index: int) -> tuple[int, str] | None:
        """(frame, new direction) where item `index` turns (a multiple of `switch_every`, at least one segment in),
        or None: with probability `switch_prob`, a pure function of (seed, index); the caption names the first
        direction, `caption_at(index, frame)` the one in force at a frame."""
        if self.switch_prob <= 0:
            return None
        rng = np.random.default_rng([self.seed, int(index), 1])
        if rng.random() >= self.switch_prob:
            return None
        segments = self.render_kwargs["num_frames"] // self.switch_every
        (_, _, direction), _ = self.spec(index)
        turned = [d for d in DIRECTIONS if d != direction]
        return int(rng.integers(1, segments)) * self.switch_every, turned[int(rng.integers(len(turned)))]

    def caption_at(self, index: int, frame: int) -> str:
        """The caption in force at `frame` of item `index` (after a switch: the new direction's)."""
        (colour, shape, direction), _ = self.spec(index)
        turn = self.switch(index)
        return caption(colour, shape, turn[1] if turn is not None and frame >= turn[0] else direction)

    def clip(self, index: int) -> np.ndarray:
        """Item `index` as uint8 [T, H, W, 3] (the evaluator's layout)."""
        (colour, shape, direction), clip_seed = self.spec(index)
        if self.boundary == "wrap":  # long-video world: constant speed, wrapping around the frame
            from vdiff.data.shapes_long import render_long_clip

            kw = self.render_kwargs
            turn = self.switch(index)
            every = self.switch_every if turn is not None else kw["num_frames"]
            directions = [turn[1] if turn is not None and k * every >= turn[0] else direction
                          for k in range(kw["num_frames"] // every)]
            return render_long_clip(colour, shape, directions, segment_frames=every, height=kw["height"],
                                    width=kw["width"], seed=clip_seed, size=kw["size"], speed=kw["speed"],
                                    position_jitter=kw["position_jitter"], motion_jitter=self.motion_jitter,
                                    turn=self.turn)
        return render_clip(colour, shape, direction, seed=clip_seed, **self.render_kwargs)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.num_samples
        (colour, shape, direction), _ = self.spec(index)
        return {
            "video": clip_to_video(self.clip(index)),  # (3, T, H, W) in [-1, 1]
            "caption": caption(colour, shape, direction),
            "index": index,
        }
