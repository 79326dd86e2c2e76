"""Read colour, shape and direction back out of a ShapesWorld-style clip and score it against its prompt.

Works on any uint8 clip [T, H, W, 3] (ShapesWorld's own, or a model's blurrier, noisier output). All thresholds
are relative to the clip, so it does not depend on the resolution or on exact pixel values:

1. Foreground. Brightness = max over RGB (every palette colour has a 255 channel, so blue is as bright as white).
   A pixel is foreground when its brightness >= max(0.5 * clip peak, 0.2), where the clip peak is the 99.9th
   percentile of brightness. In each frame the largest 8-connected foreground component is the object. A frame
   counts ("valid") only when that component covers 0.4%..35% of the frame and holds >= 60% of the frame's
   foreground pixels (one clear object, not clutter or noise). Fewer than half the frames valid -> nothing is
   read (colour, shape, direction are None, which counts as wrong) and the temporal score is 0.
2. Colour: mean RGB of the object's pixels over the valid frames, divided by its largest channel (so a dim or
   washed-out object keeps its hue), nearest palette colour (also divided by its largest channel).
3. Shape: per valid frame, two cues from the 3rd- and 4th-order cumulants of the object's intensity in a round
   window around it, minus a robust background plane and twice the background's noise level (blur adds nothing
   to cumulants above order 2, so these survive a soft, blurry rendering): skewness (0 for centrally symmetric
   shapes, ~1.65 for a triangle) and roundness (1/3 for a disc, 0 for a square).
   Medians over (up to 8 evenly spaced) valid frames; skewness > 0.4 -> triangle, else roundness > 0.2 ->
   circle, else square. A blob with no flat top (near-Gaussian, excess kurtosis ~0) has no shape -> None.
4. Direction: intensity-weighted centroids of the object in the valid frames, least-squares line over time.
   The displacement over the clip (fraction of the frame along each axis) picks the dominant axis and sign;
   less than 10% of the frame along the dominant axis -> "not moving" -> None.
5. Temporal score in [0, 1] (1 = perfectly consistent):
   presence * mean(area stability, colour stability, trajectory smoothness), with presence = valid frames / T,
   area stability = 1 - min(1, 2 * CV of the object's soft area), colour stability = 1 - min(1, 2 * mean
   per-frame hue distance to the clip's hue), trajectory smoothness = 1 - min(1, RMS residual of the line fit
   / (half the object's side)).

Measured (tests/test_shapes.py): 100% on every attribute for ShapesWorld's own clips at 16x16 to 64x64, with
backgrounds and distractors; 100% (test: >= 97%) after a Gaussian blur of sigma 1.5 px, 0.8 gain and noise of std
15/255 on 8-pixel objects (87% of shapes at sigma 2 px, noise 20/255); on noise and on mismatched prompts, no better
than chance.

    from vdiff.eval.shapes_eval import evaluate_clip, evaluate_clips, read_clip
    colour, shape, direction, *_ = read_clip(frames)             # frames: uint8 [T, H, W, 3]
    evaluate_clip(frames, "a red circle moving left").all_correct
    report = evaluate_clips(list_of_clips, prompts)                # accuracies, held-out breakdown, per clip
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from vdiff.data.shapes import COLOURS, DIRECTIONS, HELD_OUT, SHAPES, parse_caption

# Thresholds (fractions of the clip / frame; see the module docstring).
PEAK_PERCENTILE = 99.9
FG_REL_THRESHOLD = 0.5
FG_ABS_THRESHOLD = 0.2
MIN_AREA_FRAC = 0.004
MAX_AREA_FRAC = 0.35
MIN_DOMINANCE = 0.6  # the object's share of the frame's foreground pixels
MIN_VALID_FRAC = 0.5
MIN_TRAVEL_FRAC = 0.1
SHAPE_FRAMES = 8  # shape cues from at most this many valid frames, evenly spaced (the shape does not change)
OTHER_REL_THRESHOLD = 0.15  # lit pixels near the object but not connected to it are ignored by the shape cues

# Shape decision on the blur-invariant cumulant cues (see _shape_cues). Clean renders give skewness ~1.65 for
# triangles and < 0.03 otherwise, roundness ~0.34 for circles and ~0.0 for squares; blur plus noise pulls them
# towards each other, so the splits sit below the midpoints.
SKEW_SPLIT = 0.4  # skewness above -> triangle
ROUND_SPLIT = 0.2  # otherwise roundness above -> circle, below -> square

# Accuracy of a reader that guesses uniformly (for comparing scores on noise).
CHANCE = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "direction": 1 / len(DIRECTIONS),
    "all_correct": 1 / (len(COLOURS) * len(SHAPES) * len(DIRECTIONS)),
}

_PALETTE_NAMES = list(COLOURS)
_PALETTE_HUE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64) / 255.0  # max channel is 1


class ClipReading(NamedTuple):
    """What the evaluator sees in a clip. Unpack as `colour, shape, direction, *_ = read_clip(clip)`.

    confidence: per attribute in [0, 1] (0 when unreadable): 1 - d_best / d_second for colour and shape,
    |dominant| - |other| over |dominant| + |other| displacement for direction.
    info: diagnostics (valid_frames, fill, asymmetry, displacement (dx, dy) as fractions of the frame,
    area_stability, colour_stability, smoothness).
    """

    colour: str | None
    shape: str | None
    direction: str | None
    confidence: dict[str, float]
    temporal: float
    info: dict


@dataclass(frozen=True)
class ClipScore:
    """A clip scored against its prompt. A None prediction counts as wrong."""

    prompt: str
    target_colour: str
    target_shape: str
    target_direction: str
    colour: str | None
    shape: str | None
    direction: str | None
    colour_correct: bool
    shape_correct: bool
    direction_correct: bool
    all_correct: bool
    temporal: float
    held_out: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _as_clip(clip: np.ndarray) -> np.ndarray:
    if hasattr(clip, "detach"):  # a torch tensor
        clip = clip.detach().cpu().numpy()
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 2:
        raise ValueError(
            f"clip must be uint8 [T, H, W, 3] with T >= 2, got {clip.dtype} {list(clip.shape)} "
            "(convert a [3, T, H, W] video in [-1, 1] with vdiff.data.shapes.video_to_clip)"
        )
    return clip


def _object_masks(bright_THW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest foreground component per frame -> (mask [T, H, W] bool, valid [T] bool)."""
    t_len, h, w = bright_THW.shape
    peak = float(np.percentile(bright_THW, PEAK_PERCENTILE))
    thr = max(FG_REL_THRESHOLD * peak, FG_ABS_THRESHOLD)
    fg_THW = bright_THW >= thr
    masks = np.zeros_like(fg_THW)
    valid = np.zeros(t_len, dtype=bool)
    eight_in_frame = np.zeros((3, 3, 3), dtype=bool)
    eight_in_frame[1] = True  # 8-connected within a frame, never across frames
    labels_THW, n = ndimage.label(fg_THW, structure=eight_in_frame)
    sizes = np.bincount(labels_THW.ravel(), minlength=n + 1)
    sizes[0] = 0
    for t in range(t_len):
        total = int(fg_THW[t].sum())
        if total == 0:
            continue
        frame_labels = np.unique(labels_THW[t][fg_THW[t]])
        k = int(frame_labels[np.argmax(sizes[frame_labels])])
        area = int(sizes[k])
        masks[t] = labels_THW[t] == k
        valid[t] = (
            MIN_AREA_FRAC * h * w <= area <= MAX_AREA_FRAC * h * w and area >= MIN_DOMINANCE * total and area >= 3
        )
    return masks, valid


def _shape_features(mask_HW: np.ndarray) -> tuple[float, float]:
    """(fill ratio of the bounding box, vertical asymmetry) of one object mask (diagnostics)."""
    ys, xs = np.nonzero(mask_HW)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = len(ys) / float((y1 - y0 + 1) * (x1 - x0 + 1))
    mid = (y0 + y1) / 2.0
    below = np.sum(ys > mid) + 0.5 * np.sum(ys == mid)
    above = np.sum(ys < mid) + 0.5 * np.sum(ys == mid)
    return fill, float((below - above) / len(ys))


def _disc(radius: int) -> np.ndarray:
    """Boolean disc structuring element of the given radius, [2r+1, 2r+1]."""
    r = np.arange(-radius, radius + 1)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius**2 + radius  # + r: a rounder disc at small radii


def _masked_row_median(vals_VN: np.ndarray, keep_VN: np.ndarray) -> np.ndarray:
    """Median of each row over its kept entries -> [V] (0 for a row with none)."""
    n = keep_VN.sum(axis=1)
    srt = np.sort(np.where(keep_VN, vals_VN, np.inf), axis=1)
    lo, hi = np.maximum(n - 1, 0) // 2, np.maximum(n, 1) // 2
    rows = np.arange(len(n))
    return np.where(n > 0, (srt[rows, lo] + srt[rows, np.minimum(hi, np.maximum(n - 1, 0))]) / 2, 0.0)


def _background_planes(bright_VHW: np.ndarray, ring_VHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust plane a + b*x + c*y fitted to each frame's ring pixels -> (background [V, H, W], 2 x noise std [V])."""
    v_len, h, w = bright_VHW.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    basis = np.stack([np.ones_like(xs), xs, ys])  # (3, H, W)
    keep = ring_VHW.copy()
    planes = np.zeros((v_len, 3))
    sigma = np.zeros(v_len)
    fit = ring_VHW.sum(axis=(1, 2)) >= 6
    for _ in range(2):  # refit without outliers (a distractor or a neighbour's edge in the ring)
        wk = keep * fit[:, None, None]  # (V, H, W)
        normal = np.einsum("vhw,ihw,jhw->vij", wk, basis, basis) + 1e-9 * np.eye(3)  # (V, 3, 3)
        rhs = np.einsum("vhw,ihw,vhw->vi", wk, basis, bright_VHW)  # (V, 3)
        planes = np.linalg.solve(normal, rhs[..., None])[..., 0]  # (V, 3)
        resid = bright_VHW - np.einsum("vi,ihw->vhw", planes, basis)  # (V, H, W)
        r, kp = resid.reshape(v_len, -1), keep.reshape(v_len, -1)
        med = _masked_row_median(r, kp)
        sigma = np.where(fit, 1.4826 * _masked_row_median(np.abs(r - med[:, None]), kp), 0.0)
        keep = ring_VHW & (np.abs(resid) <= 3 * sigma[:, None, None] + 1e-3)
    bg = np.einsum("vi,ihw->vhw", planes, basis) * fit[:, None, None]
    return bg, 2.0 * sigma


def _shape_cues(bright_VHW: np.ndarray, mask_VHW: np.ndarray) -> np.ndarray:
    """Blur-invariant shape cues per frame from the cumulants of the object's intensity -> [V, 2] (NaN: none).

    Treat the background-subtracted intensity near the object as a 2-D distribution. Blurring with a symmetric
    kernel adds the kernel's cumulants, and a Gaussian has none above order 2, so third- and fourth-order
    cumulants (and their ratios) survive blur:
      roundness = -k22 / k4: 0 for a square (x and y independent), 1/3 for a disc;
      skewness  = |third-order cumulant tensor| / k4^(3/4): 0 for centrally symmetric shapes, ~1.65 for a triangle
    (k4 = minus the mean of the x and y fourth cumulants, > 0 for flat-topped shapes). A frame whose object is
    too blob-like to tell (excess kurtosis near 0, e.g. a Gaussian smudge) gets NaN.
    """
    v_len, h, w = bright_VHW.shape
    side = math.sqrt(float(np.median(mask_VHW.sum(axis=(1, 2)))))
    # A round window: a square one would bias the 4th-order cues (noise in its corners weighs distance^4).
    region = ndimage.binary_dilation(mask_VHW, structure=_disc(max(1, round(0.5 * side)))[None])
    ring = ndimage.binary_dilation(region, structure=_disc(2)[None]) & ~region
    bg, floor = _background_planes(bright_VHW, ring)
    # Subtract the plane plus twice the background's noise level, clip at 0: what remains is the object (its
    # blurred edges included), without a positive halo of noise that the distance^4 weights would amplify.
    wgt = np.clip(bright_VHW - bg - floor[:, None, None], 0.0, None) * region  # (V, H, W)
    # Drop other things inside the window (distractors, a second blob): lit pixels not connected to the object.
    lit = wgt > OTHER_REL_THRESHOLD * wgt.max(axis=(1, 2), keepdims=True)
    eight_in_frame = np.zeros((3, 3, 3), dtype=bool)
    eight_in_frame[1] = True
    labels, _ = ndimage.label(lit, structure=eight_in_frame)
    own = np.unique(labels[mask_VHW & lit])
    wgt[lit & ~np.isin(labels, own[own > 0])] = 0.0

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = wgt.sum(axis=(1, 2))  # (V,)
    ok = mass > 0
    mass = np.where(ok, mass, 1.0)[:, None, None]
    x = xs - (wgt * xs).sum(axis=(1, 2), keepdims=True) / mass  # (V, H, W), centred
    y = ys - (wgt * ys).sum(axis=(1, 2), keepdims=True) / mass
    e = lambda f: (wgt * f).sum(axis=(1, 2)) / mass[:, 0, 0]  # noqa: E731
    k20, k02, k11 = e(x * x), e(y * y), e(x * y)
    k40, k04 = e(x**4) - 3 * k20**2, e(y**4) - 3 * k02**2
    k22 = e(x * x * y * y) - k20 * k02 - 2 * k11**2
    k4 = -(k40 + k04) / 2.0  # > 0 for compact flat-topped shapes
    ok &= k4 > 0.05 * k20 * k02
    k4 = np.where(ok, k4, 1.0)
    k3 = np.sqrt(e(x**3) ** 2 + 3 * e(x * x * y) ** 2 + 3 * e(x * y * y) ** 2 + e(y**3) ** 2)
    cues = np.stack([-k22 / k4, k3 / k4**0.75], axis=1)  # (V, 2)
    cues[~ok] = np.nan
    return cues


def _nearest(dists: np.ndarray) -> tuple[int, float]:
    order = np.argsort(dists)
    best, second = float(dists[order[0]]), float(dists[order[1]])
    return int(order[0]), (1.0 - best / second) if second > 0 else 0.0


def _unreadable(t_len: int, n_valid: int) -> ClipReading:
    return ClipReading(
        None, None, None, {"colour": 0.0, "shape": 0.0, "direction": 0.0}, 0.0,
        {"valid_frames": n_valid, "num_frames": t_len},
    )  # fmt: skip


def read_clip(clip: np.ndarray) -> ClipReading:
    """Read (colour, shape, direction) and a temporal-consistency score from a uint8 clip [T, H, W, 3]."""
    clip_THW3 = _as_clip(clip)
    t_len, h, w, _ = clip_THW3.shape
    rgb_THW3 = clip_THW3.astype(np.float64) / 255.0
    bright_THW = rgb_THW3.max(axis=-1)
    masks_THW, valid_T = _object_masks(bright_THW)
    frames = np.flatnonzero(valid_T)
    if len(frames) < max(2, math.ceil(MIN_VALID_FRAC * t_len)):
        return _unreadable(t_len, len(frames))

    # --- colour: mean hue of the object's pixels over all valid frames
    obj_rgb = rgb_THW3[masks_THW & valid_T[:, None, None]]  # (N, 3)
    mean_rgb = obj_rgb.mean(axis=0)
    hue = mean_rgb / max(mean_rgb.max(), 1e-6)
    c_idx, c_conf = _nearest(np.linalg.norm(_PALETTE_HUE - hue, axis=1))

    # --- shape: median blur-invariant cues over the valid frames
    shape_frames = frames[
        np.unique(np.linspace(0, len(frames) - 1, min(SHAPE_FRAMES, len(frames))).round().astype(int))
    ]
    fill, asym = np.median(np.array([_shape_features(masks_THW[t]) for t in shape_frames]), axis=0)
    cues = _shape_cues(bright_THW[shape_frames], masks_THW[shape_frames])  # (S, 2)
    cues = cues[~np.isnan(cues).any(axis=1)]
    if len(cues) >= math.ceil(MIN_VALID_FRAC * len(shape_frames)):
        roundness, skewness = np.median(cues, axis=0)
        if skewness > SKEW_SPLIT:
            shape, s_conf = "triangle", min(1.0, (skewness - SKEW_SPLIT) / SKEW_SPLIT)
        else:
            shape = "circle" if roundness > ROUND_SPLIT else "square"
            s_conf = min(1.0, abs(roundness - ROUND_SPLIT) / ROUND_SPLIT, (SKEW_SPLIT - skewness) / SKEW_SPLIT)
        s_conf = float(s_conf)
    else:
        shape, s_conf, roundness, skewness = None, 0.0, float("nan"), float("nan")

    # --- per-frame soft measurements on the object grown by one pixel (keeps anti-aliased / blurred edges)
    grown_VHW = ndimage.binary_dilation(masks_THW[frames], structure=np.ones((1, 3, 3), dtype=bool))
    wgt_VHW = bright_THW[frames] * grown_VHW
    soft_areas = wgt_VHW.sum(axis=(1, 2))  # (V,)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    centroids = (
        np.stack([(wgt_VHW.sum(axis=1) * xs).sum(axis=1), (wgt_VHW.sum(axis=2) * ys).sum(axis=1)], axis=1)
        / soft_areas[:, None]
    )  # (V, 2) as (x, y) in pixels
    obj_VHW = masks_THW[frames]
    mean_V3 = (rgb_THW3[frames] * obj_VHW[..., None]).sum(axis=(1, 2)) / obj_VHW.sum(axis=(1, 2))[:, None]
    hues = mean_V3 / np.maximum(mean_V3.max(axis=1, keepdims=True), 1e-6)  # (V, 3)

    # --- direction: least-squares line through the centroids over time
    tt = frames.astype(np.float64)
    design = np.stack([tt, np.ones_like(tt)], axis=1)  # (V, 2)
    coef, *_ = np.linalg.lstsq(design, centroids, rcond=None)  # (2, 2): rows slope, offset; cols x, y
    disp = coef[0] * (t_len - 1) / np.array([w, h])  # displacement over the clip as a fraction of the frame
    axis = int(np.argmax(np.abs(disp)))
    dom, other = abs(disp[axis]), abs(disp[1 - axis])
    if dom < MIN_TRAVEL_FRAC:
        direction, d_conf = None, 0.0
    else:
        direction = (("left", "right"), ("up", "down"))[axis][int(disp[axis] > 0)]
        d_conf = float((dom - other) / (dom + other))

    # --- temporal consistency
    presence = len(frames) / t_len
    area_stab = 1.0 - min(1.0, 2.0 * soft_areas.std() / max(soft_areas.mean(), 1e-6))
    colour_stab = 1.0 - min(1.0, 2.0 * float(np.linalg.norm(hues - hues.mean(axis=0), axis=1).mean()))
    resid = centroids - design @ coef
    side = math.sqrt(masks_THW[frames].sum() / len(frames))
    smooth = 1.0 - min(1.0, float(np.sqrt((resid**2).sum(axis=1).mean())) / (0.5 * side))
    temporal = presence * (area_stab + colour_stab + smooth) / 3.0

    return ClipReading(
        colour=_PALETTE_NAMES[c_idx],
        shape=shape,
        direction=direction,
        confidence={"colour": c_conf, "shape": s_conf, "direction": d_conf},
        temporal=float(temporal),
        info={
            "valid_frames": len(frames),
            "num_frames": t_len,
            "fill": float(fill),
            "asymmetry": float(asym),
            "roundness": float(roundness),
            "skewness": float(skewness),
            "displacement": (float(disp[0]), float(disp[1])),
            "area_stability": float(area_stab),
            "colour_stability": float(colour_stab),
            "smoothness": float(smooth),
        },
    )


def evaluate_clip(clip: np.ndarray, prompt: str) -> ClipScore:
    """Score a uint8 clip [T, H, W, 3] against its ShapesWorld prompt ("a red circle moving left")."""
    colour, shape, direction = parse_caption(prompt)
    r = read_clip(clip)
    ok = (r.colour == colour, r.shape == shape, r.direction == direction)
    return ClipScore(
        prompt=prompt,
        target_colour=colour,
        target_shape=shape,
        target_direction=direction,
        colour=r.colour,
        shape=r.shape,
        direction=r.direction,
        colour_correct=ok[0],
        shape_correct=ok[1],
        direction_correct=ok[2],
        all_correct=all(ok),
        temporal=r.temporal,
        held_out=(colour, shape, direction) in set(HELD_OUT),
    )


def summarize(scores: list[ClipScore]) -> dict:
    """Rates over scored clips: {num_clips, colour, shape, direction, all_correct, temporal} (None when empty)."""
    n = len(scores)
    if n == 0:
        return {"num_clips": 0, "colour": None, "shape": None, "direction": None, "all_correct": None,
                "temporal": None}  # fmt: skip
    return {
        "num_clips": n,
        "colour": sum(s.colour_correct for s in scores) / n,
        "shape": sum(s.shape_correct for s in scores) / n,
        "direction": sum(s.direction_correct for s in scores) / n,
        "all_correct": sum(s.all_correct for s in scores) / n,
        "temporal": sum(s.temporal for s in scores) / n,
    }


def evaluate_clips(clips: Iterable[np.ndarray] | np.ndarray, prompts: Sequence[str]) -> dict:
    """Score clips against prompts.

    Returns {"num_clips", "colour", "shape", "direction" (per-attribute accuracy), "all_correct", "temporal"
    (mean score), "heldout": same keys over prompts in HELD_OUT, "seen": same keys over the others,
    "per_clip": [ClipScore.to_dict(), ...]}. Accuracies are fractions in [0, 1].
    """
    clips = list(clips)
    prompts = list(prompts)
    if len(clips) != len(prompts):
        raise ValueError(f"got {len(clips)} clips but {len(prompts)} prompts; they must pair up")
    scores = [evaluate_clip(c, p) for c, p in zip(clips, prompts)]
    out = summarize(scores)
    out["heldout"] = summarize([s for s in scores if s.held_out])
    out["seen"] = summarize([s for s in scores if not s.held_out])
    out["per_clip"] = [s.to_dict() for s in scores]
    return out
