"""ShapesWorld (vdiff.data.shapes) and its evaluator (vdiff.eval.shapes_eval), checked against known answers."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from vdiff.data.shapes import (
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    ShapesWorld,
    all_combinations,
    caption,
    clip_to_video,
    parse_caption,
    render_clip,
    train_combinations,
    video_to_clip,
)
from vdiff.eval.shapes_eval import CHANCE, evaluate_clip, evaluate_clips, read_clip

# ------------------------------------------------------------------------------------------------ grammar


def test_caption_roundtrip_and_counts():
    combos = all_combinations()
    assert len(combos) == len(set(combos)) == 72
    for combo in combos:
        assert parse_caption(caption(*combo)) == combo
    assert caption("red", "circle", "left") == "a red circle moving left"
    assert parse_caption("  A Red Circle moving LEFT. ") == ("red", "circle", "left")


@pytest.mark.parametrize(
    "text, word",
    [("a purple circle moving left", "colour"), ("a red hexagon moving left", "shape"),
     ("a red circle moving sideways", "direction"), ("red circle going left", "does not match")],
)  # fmt: skip
def test_parse_caption_errors_name_the_problem(text, word):
    with pytest.raises(ValueError, match=word):
        parse_caption(text)


def test_held_out_split_keeps_every_word_and_pair_in_training():
    train, held = train_combinations(), list(HELD_OUT)
    assert len(held) == len(set(held)) == 6
    assert set(train) | set(held) == set(all_combinations()) and not set(train) & set(held)
    for i, j in itertools.combinations(range(3), 2):  # every pair of attributes still seen in training
        train_pairs = {(c[i], c[j]) for c in train}
        assert {(c[i], c[j]) for c in all_combinations()} == train_pairs


# ------------------------------------------------------------------------------------------------ rendering


def _soft_centroid(frame_HW3: np.ndarray) -> tuple[float, float]:
    w = frame_HW3.max(axis=-1).astype(np.float64)
    ys, xs = np.mgrid[0 : w.shape[0], 0 : w.shape[1]]
    return (w * (xs + 0.5)).sum() / w.sum(), (w * (ys + 0.5)).sum() / w.sum()


@pytest.mark.parametrize("shape, area_factor", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_render_geometry_matches_the_rules(shape, area_factor, direction):
    t_len, h, w = 16, 32, 32
    clip = render_clip("yellow", shape, direction, num_frames=t_len, height=h, width=w, seed=11)
    assert clip.dtype == np.uint8 and clip.shape == (t_len, h, w, 3)
    assert not clip[..., 2].any()  # yellow has no blue, the background is black
    side = 0.25 * 32
    # The whole object is inside the frame on every frame: its anti-aliased mass is the analytic area.
    mass = clip[..., 0].astype(np.float64).sum(axis=(1, 2)) / 255.0
    np.testing.assert_allclose(mass, area_factor * side**2, rtol=0.04)
    # Interior pixels are exactly the palette colour.
    assert (clip[..., :2] == 255).all(axis=-1).sum() > 0.5 * area_factor * side**2 * t_len
    # Straight line at constant speed, half the frame in the named direction.
    cents = np.array([_soft_centroid(f) for f in clip])  # (T, 2) as (x, y)
    disp = cents[-1] - cents[0]
    dx, dy = {"left": (-16, 0), "right": (16, 0), "up": (0, -16), "down": (0, 16)}[direction]
    np.testing.assert_allclose(disp, [dx, dy], atol=0.3)
    np.testing.assert_allclose(np.diff(cents, axis=0), np.broadcast_to(disp / (t_len - 1), (t_len - 1, 2)), atol=0.2)


def test_render_deterministic_by_seed():
    a = render_clip("blue", "triangle", "up", seed=5)
    assert np.array_equal(a, render_clip("blue", "triangle", "up", seed=5))
    starts = {_soft_centroid(render_clip("blue", "triangle", "up", seed=s)[0]) for s in range(8)}
    assert len({(round(x, 2), round(y, 2)) for x, y in starts}) == 8  # different seeds, different positions


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_position_jitter_narrows_the_start_range_around_its_centre(direction):
    h = w = 32
    side, travel = 0.25 * 32, 0.5 * 32
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    # The allowed first-frame centres (object inside the frame on every frame), and their middle.
    x_lo, x_hi = side / 2 + (travel if dx < 0 else 0), w - side / 2 - (travel if dx > 0 else 0)
    y_lo, y_hi = side / 2 + (travel if dy < 0 else 0), h - side / 2 - (travel if dy > 0 else 0)
    mid = np.array([(x_lo + x_hi) / 2, (y_lo + y_hi) / 2])
    half = np.array([(x_hi - x_lo) / 2, (y_hi - y_lo) / 2])
    # 0: one path per caption, starting at the middle of the range, whatever the seed.
    zero = [render_clip("white", "square", direction, seed=s, position_jitter=0.0) for s in range(4)]
    assert all(np.array_equal(zero[0], c) for c in zero[1:])
    np.testing.assert_allclose(_soft_centroid(zero[0][0]), mid, atol=0.05)
    # 0.25: starts scatter, but only within the middle quarter of the range (full range: they use all of it).
    for jitter, lo_frac in ((0.25, None), (1.0, 0.6)):
        starts = np.array([_soft_centroid(render_clip("white", "square", direction, seed=s, position_jitter=jitter)[0])
                           for s in range(40)])
        spread = np.abs(starts - mid).max(axis=0)
        assert (spread <= jitter * half + 0.05).all(), (jitter, spread, half)
        assert len({tuple(np.round(p, 3)) for p in starts}) >= 20  # starts still vary (on a 1/4-pixel raster)
        if lo_frac is not None:
            assert (spread >= lo_frac * half).all()
    # The default is the full range, byte for byte.
    assert np.array_equal(render_clip("red", "circle", direction, seed=3),
                          render_clip("red", "circle", direction, seed=3, position_jitter=1.0))
    # The dataset passes it through.
    ds = ShapesWorld(4, num_frames=8, height=16, width=16, seed=1, position_jitter=0.0)
    (c, sh, d), _ = ds.spec(0)
    assert np.array_equal(ds.clip(0), render_clip(c, sh, d, num_frames=8, height=16, width=16, seed=99,
                                                  position_jitter=0.0))


def test_render_rejects_bad_arguments_with_the_field_name():
    with pytest.raises(ValueError, match="colour"):
        render_clip("purple", "circle", "left")
    with pytest.raises(ValueError, match="size"):
        render_clip("red", "circle", "left", size=0.1)  # 3 pixels: not a shape any more
    with pytest.raises(ValueError, match="speed"):
        render_clip("red", "circle", "left", size=0.5, speed=0.8)  # does not fit
    with pytest.raises(ValueError, match="background"):
        render_clip("red", "circle", "left", background="stars")
    with pytest.raises(ValueError, match="num_frames"):
        render_clip("red", "circle", "left", num_frames=1)
    with pytest.raises(ValueError, match=r"position_jitter must be a number in \[0.0, 1.0\]"):
        render_clip("red", "circle", "left", position_jitter=1.5)


def test_harder_variants_keep_the_object_brightest():
    clip = render_clip("red", "square", "down", seed=1, background="noise", distractors=3)
    plain = render_clip("red", "square", "down", seed=1)
    assert (clip != plain).any()
    inside, touched = plain[..., 0] == 255, plain[..., 0] > 0
    assert (clip[inside] == plain[inside]).all()  # the object is drawn over the background and distractors
    assert clip[~touched].max() < 128  # which stay below half the object's brightness


# ------------------------------------------------------------------------------------------------ dataset


def test_dataset_item_format_and_values():
    ds = ShapesWorld(8, seed=3)
    item = ds[2]
    assert set(item) == {"video", "caption", "index"} and item["index"] == 2
    v = item["video"]
    assert v.dtype == torch.float32 and v.shape == (3, 16, 32, 32)
    assert v.min() == -1.0 and v.max() == 1.0  # black background, saturated object
    (colour, shape, direction), seed = ds.spec(2)
    assert item["caption"] == caption(colour, shape, direction)
    assert np.array_equal(video_to_clip(v), render_clip(colour, shape, direction, seed=seed))
    assert torch.equal(clip_to_video(video_to_clip(v)), v)


def test_dataset_deterministic_across_instances_and_workers():
    a, b = ShapesWorld(6, seed=7), ShapesWorld(6, seed=7)
    loader = torch.utils.data.DataLoader(b, batch_size=3, num_workers=2)
    batches = list(loader)
    videos = torch.cat([bt["video"] for bt in batches])
    caps = sum((bt["caption"] for bt in batches), [])
    for i in range(6):
        assert torch.equal(a[i]["video"], videos[i]) and a[i]["caption"] == caps[i]
    c = ShapesWorld(6, seed=8)
    assert any(not torch.equal(a[i]["video"], c[i]["video"]) for i in range(6))


def test_dataset_splits():
    held = {caption(*c) for c in HELD_OUT}
    train, heldout = ShapesWorld(600, split="train"), ShapesWorld(60, split="heldout")
    assert {caption(*train.spec(i)[0]) for i in range(600)} == {caption(*c) for c in train_combinations()}
    assert {caption(*heldout.spec(i)[0]) for i in range(60)} == held
    assert all(train[i]["caption"] not in held for i in range(20))
    assert {heldout[i]["caption"] for i in range(10)} <= held
    with pytest.raises(ValueError, match="split"):
        ShapesWorld(4, split="test")


# ------------------------------------------------------------------------------------------------ evaluator


@pytest.fixture(scope="module")
def world_clips():
    """Every combination at 3 seeds: 216 (clip, prompt) pairs."""
    pairs = [(render_clip(*c, seed=seed), caption(*c)) for seed in (0, 1, 2) for c in all_combinations()]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_evaluator_reads_every_combination(world_clips):
    clips, prompts = world_clips
    res = evaluate_clips(clips, prompts)
    assert res["num_clips"] == 216
    for key in ("colour", "shape", "direction", "all_correct"):
        assert res[key] >= 0.99, (key, res[key])
    assert res["temporal"] >= 0.95 and all(0.0 <= c["temporal"] <= 1.0 for c in res["per_clip"])
    assert res["heldout"]["num_clips"] == 18 and res["heldout"]["all_correct"] >= 0.99


@pytest.mark.parametrize(
    "kwargs",
    [dict(height=64, width=64), dict(height=48, width=64, num_frames=8), dict(height=16, width=16, num_frames=8),
     dict(size=0.4), dict(size=0.125),
     dict(background="noise"), dict(background="gradient"), dict(distractors=3)],
)  # fmt: skip
def test_evaluator_reads_variants(kwargs):
    combos = all_combinations()[::5]
    res = evaluate_clips([render_clip(*c, seed=4, **kwargs) for c in combos], [caption(*c) for c in combos])
    assert res["all_correct"] >= 0.99, res


def _degrade(clip, rng, sigma, noise_std, gain):
    x = ndimage.gaussian_filter(clip.astype(np.float64), sigma=(0, sigma, sigma, 0)) * gain
    return np.clip(x + rng.normal(0, noise_std, x.shape), 0, 255).astype(np.uint8)


def test_evaluator_robust_to_blur_and_noise():
    """Generated clips are softer and noisier than the renders; the evaluator should still read them."""
    rng = np.random.default_rng(0)
    combos = all_combinations()
    clips = [_degrade(render_clip(*c, seed=9), rng, sigma=1.5, noise_std=15, gain=0.8) for c in combos]
    res = evaluate_clips(clips, [caption(*c) for c in combos])
    assert min(res["colour"], res["shape"], res["direction"]) >= 0.97, res
    assert res["temporal"] >= 0.8


def _random_prompts(rng, n):
    combos = all_combinations()
    return [caption(*combos[i]) for i in rng.integers(len(combos), size=n)]


def test_evaluator_on_noise_is_not_better_than_chance():
    rng = np.random.default_rng(1)
    n = 60
    uniform = [rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8) for _ in range(n)]
    # Smooth, sparse noise makes drifting coloured blobs that the evaluator does read as objects; they must not
    # match random prompts more often than chance.
    blobs = []
    for _ in range(n):
        x = ndimage.gaussian_filter(rng.normal(0, 1, (16, 32, 32, 3)), (2, 3, 3, 0))
        blobs.append(np.clip((x / x.std() - 1.8) * 255, 0, 255).astype(np.uint8))
    assert sum(read_clip(b).colour is not None for b in blobs) >= n // 5
    for clips in (uniform, blobs):
        res = evaluate_clips(clips, _random_prompts(rng, n))
        for key in ("colour", "shape", "direction"):
            assert res[key] < 0.6 and res[key] <= CHANCE[key] + 0.15, (key, res[key])
        assert res["all_correct"] <= 0.05
        assert res["temporal"] < 0.5 and all(0.0 <= c["temporal"] <= 1.0 for c in res["per_clip"])
    assert read_clip(uniform[0])[:3] == (None, None, None)


def test_evaluator_against_mismatched_prompts_is_near_chance(world_clips):
    """Real ShapesWorld clips scored against random prompts: each attribute matches at about chance rate."""
    rng = np.random.default_rng(2)
    clips = world_clips[0][::-1][:144]
    res = evaluate_clips(clips, _random_prompts(rng, 144))
    for key in ("colour", "shape", "direction"):
        p = CHANCE[key]
        assert abs(res[key] - p) <= 4 * math.sqrt(p * (1 - p) / 144), (key, res[key], p)
    assert res["all_correct"] <= 0.05


def test_evaluate_clip_fields_and_partial_credit():
    clip = render_clip("green", "circle", "down", seed=0)
    s = evaluate_clip(clip, "a green square moving down")
    assert (s.colour, s.shape, s.direction) == ("green", "circle", "down")
    assert s.colour_correct and not s.shape_correct and s.direction_correct and not s.all_correct
    assert not s.held_out and evaluate_clip(clip, "a yellow circle moving down").held_out
    colour, shape, direction, *_ = read_clip(clip)
    assert (colour, shape, direction) == ("green", "circle", "down")
    res = evaluate_clips([clip, clip], ["a green circle moving down", "a red circle moving up"])
    assert (res["colour"], res["shape"], res["direction"], res["all_correct"]) == (0.5, 1.0, 0.5, 0.5)


def test_static_and_empty_clips_are_read_as_none():
    static = render_clip("white", "square", "left", speed=0.0, seed=0)
    r = read_clip(static)
    assert (r.colour, r.shape, r.direction) == ("white", "square", None)
    assert not evaluate_clip(static, "a white square moving left").direction_correct
    black = np.zeros((16, 32, 32, 3), dtype=np.uint8)
    assert read_clip(black)[:3] == (None, None, None) and read_clip(black).temporal == 0.0


def test_temporal_score_drops_for_flicker_and_jumps():
    clip = render_clip("magenta", "triangle", "right", seed=3)
    flicker = clip.copy()
    flicker[1::2] = render_clip("green", "triangle", "right", seed=3)[1::2]
    jumpy = clip[np.random.default_rng(0).permutation(16)]
    base = read_clip(clip).temporal
    assert base >= 0.95
    assert read_clip(flicker).temporal < base - 0.2
    assert read_clip(jumpy).temporal < base - 0.2


def test_evaluator_rejects_wrong_layout():
    clip = render_clip("red", "circle", "left")
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        read_clip(clip.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        read_clip(clip.transpose(3, 0, 1, 2))
    with pytest.raises(ValueError, match="pair up"):
        evaluate_clips([clip], [])
    assert set(COLOURS) and set(SHAPES)


# --------------------------------------------------------------------------------------------------------------------
# Long clips: wrap-around motion and direction changes (vdiff.data.shapes_long)
# --------------------------------------------------------------------------------------------------------------------


def _circular_centre(frame, axis):
    """Object centre along `axis` (1 = x, 0 = y) of a wrapped frame, modulo the frame (circular mean of coverage)."""
    mass = frame.max(-1).astype(float)  # (H, W) brightness
    n = mass.shape[axis]
    angles = 2 * np.pi * (np.arange(n) + 0.5) / n
    profile = mass.sum(axis=1 - axis)  # along the axis
    z = (profile * np.exp(1j * angles)).sum()
    return (np.angle(z) % (2 * np.pi)) * n / (2 * np.pi)


def test_long_clip_wraps_and_keeps_moving_at_constant_speed():
    from vdiff.data.shapes_long import REFERENCE_FRAMES, render_long_clip

    frames = render_long_clip("red", "square", ["right"] * 12, segment_frames=4, height=16, width=16, seed=3)
    assert frames.shape == (48, 16, 16, 3)
    assert np.array_equal(frames, render_long_clip("red", "square", ["right"] * 12, segment_frames=4, height=16,
                                                   width=16, seed=3))  # deterministic by seed
    step = 0.5 * 16 / (REFERENCE_FRAMES - 1)
    xs = np.array([_circular_centre(f, 1) for f in frames])
    moved = (np.diff(xs) + 8) % 16 - 8  # per-frame motion, unwrapped
    # right, at constant speed, across the edge too (per frame to the pixel grid's rendering error; over the clip
    # to a fraction of a pixel)
    assert (moved > step - 0.3).all() and (moved < step + 0.3).all()
    assert abs(moved.sum() - 47 * step) < 0.3
    assert 48 * step > 16  # it wrapped at least once
    assert (frames.max(-1) > 128).sum(axis=(1, 2)).min() >= 12  # the whole object is visible on every frame
    straddles = [(f[:, 0].max() > 128) and (f[:, -1].max() > 128) for f in frames]
    assert any(straddles)  # drawn on both edges while it crosses
    ys = np.array([_circular_centre(f, 0) for f in frames])
    assert np.ptp(ys) < 0.05  # no drift across the motion


@pytest.mark.parametrize("direction", ["right", "up"])
def test_long_clip_motion_jitter_spreads_starts_along_the_motion_axis_only(direction):
    """motion_jitter=1 with position_jitter=0.15: starts cover the (wrapping) motion axis, and across it they stay
    within the middle 15% of the room, as with position_jitter alone."""
    from vdiff.data.shapes_long import render_long_clip

    along, across = (1, 0) if direction == "right" else (0, 1)
    starts = np.array([[_circular_centre(render_long_clip("red", "square", [direction], segment_frames=2,
                                                          height=16, width=16, seed=k, position_jitter=0.15,
                                                          motion_jitter=1.0)[0], axis) for axis in (along, across)]
                       for k in range(64)])
    room = 8 - 0.25 * 16 / 2  # centre +- (half the frame - half the object)
    assert np.ptp(starts[:, 0]) > 1.6 * room  # along: spread over most of the frame (crossing its edges)
    # across: the narrow band around the centre (+ a quarter pixel: the 4 x 4 supersampling's grid)
    assert np.abs(starts[:, 1] - 8).max() <= 0.15 * room + 0.26
    with pytest.raises(ValueError, match="motion_jitter"):
        ShapesWorld(4, boundary="stop", motion_jitter=0.5)
    with pytest.raises(ValueError, match="motion_jitter"):
        render_long_clip("red", "square", ["up"], segment_frames=2, motion_jitter=1.5)


def test_long_clip_direction_changes_at_segment_boundaries():
    from vdiff.data.shapes_long import render_long_clip, segment_captions

    directions = ["right", "right", "up", "up"]
    frames = render_long_clip("blue", "circle", directions, segment_frames=4, height=16, width=16, seed=1)
    xs = np.array([_circular_centre(f, 1) for f in frames])
    ys = np.array([_circular_centre(f, 0) for f in frames])
    dx, dy = (np.diff(xs) + 8) % 16 - 8, (np.diff(ys) + 8) % 16 - 8
    assert (dx[:7] > 0.3).all() and (np.abs(dy[:7]) < 0.05).all()  # frames 0-7: right
    assert (dy[8:] < -0.3).all() and (np.abs(dx[8:]) < 0.05).all()  # frames 8-15: up
    assert segment_captions("blue", "circle", directions)[2] == "a blue circle moving up"
    ds = ShapesWorld(4, num_frames=24, height=16, width=16, boundary="wrap")
    assert ds[0]["video"].shape == (3, 24, 16, 16)
    with pytest.raises(ValueError, match="boundary must be 'stop'"):
        ShapesWorld(4, boundary="bounce")


def test_long_clip_crisp_turn_moves_into_a_segment_by_its_own_direction():
    """turn="carry" places a new segment's first frame by the old motion, turn="crisp" by the new one; every other
    move is the same, and a clip that does not turn is the same bytes either way."""
    from train.config import DataConfig
    from vdiff.config import ConfigError
    from vdiff.data.shapes_long import render_long_clip

    def moves(turn):
        frames = render_long_clip("blue", "circle", ["right", "right", "up", "up"], segment_frames=4, height=16,
                                  width=16, seed=1, turn=turn)
        xs = np.array([_circular_centre(f, 1) for f in frames])
        ys = np.array([_circular_centre(f, 0) for f in frames])
        return (np.diff(xs) + 8) % 16 - 8, (np.diff(ys) + 8) % 16 - 8

    (cdx, cdy), (kdx, kdy) = moves("crisp"), moves("carry")
    assert kdx[7] > 0.3 and abs(kdy[7]) < 0.05  # carry: frame 7 -> 8 (into the "up" segment) still moves right
    assert cdy[7] < -0.3 and abs(cdx[7]) < 0.05  # crisp: it moves up
    others = np.arange(15) != 7
    # the same moves elsewhere (to the rendering's subpixel error: after the turn the two sit a step apart)
    np.testing.assert_allclose(cdx[others], kdx[others], atol=0.1)
    np.testing.assert_allclose(cdy[others], kdy[others], atol=0.1)
    straight = [render_long_clip("red", "square", ["left"] * 3, segment_frames=2, seed=4, turn=t)
                for t in ("carry", "crisp")]
    assert np.array_equal(*straight)
    world = ShapesWorld(16, num_frames=8, height=16, width=16, boundary="wrap", switch_prob=1.0, switch_every=2,
                        turn="crisp")
    turned = [i for i in range(16) if world.switch(i) is not None]
    carry = ShapesWorld(16, num_frames=8, height=16, width=16, boundary="wrap", switch_prob=1.0, switch_every=2)
    assert turned and not np.array_equal(world.clip(turned[0]), carry.clip(turned[0]))  # the world renders its turn
    recipe = DataConfig(dataset="shapes", boundary="wrap", switch_prob=1.0, switch_every=2, num_frames=8,
                        turn="crisp")
    assert recipe.shapes_world().turn == "crisp"
    with pytest.raises(ValueError, match="turn must be one of"):
        render_long_clip("red", "square", ["up"], segment_frames=2, turn="smooth")
    with pytest.raises(ValueError, match="turn .* must be 'carry' or 'crisp'"):
        ShapesWorld(4, boundary="wrap", turn="smooth")
    with pytest.raises(ConfigError, match="data.turn must be 'carry' or 'crisp', got 'x'"):
        DataConfig(turn="x")


def test_long_eval_reads_real_long_clips_per_chunk_and_flags_seams():
    """On real wrap-around clips every chunk reads right and the seam ratio is ~1; a clip whose chunks restart the
    object elsewhere has a visible seam; a direction switch is read within one chunk of it."""
    from vdiff.data.shapes_long import render_long_clip
    from vdiff.eval.long_eval import score_long_clip, summarize_long

    combos = list(itertools.product(["red", "white"], ["circle", "square", "triangle"], DIRECTIONS))
    scores, switched = [], []
    turn = {"left": "up", "up": "right", "right": "down", "down": "left"}
    for i, (c, s, d) in enumerate(combos):
        frames = render_long_clip(c, s, [d] * 16, segment_frames=2, height=16, width=16, seed=i, position_jitter=0.15)
        scores.append(score_long_clip(frames, [caption(c, s, d)] * 16, 2))
        frames = render_long_clip(c, s, [d] * 8 + [turn[d]] * 8, segment_frames=2, height=16, width=16, seed=i)
        switched.append(score_long_clip(frames, [caption(c, s, d)] * 8 + [caption(c, s, turn[d])] * 8, 2,
                                        switch_at=8))
    report = summarize_long(scores)
    assert report["all_correct"] == 1.0 and report["last4_all_correct"] == report["first4_all_correct"] == 1.0
    assert abs(report["seam_ratio"] - 1.0) < 0.05
    assert summarize_long(switched)["switch_followed"] == 1.0
    restarts = np.concatenate([render_long_clip("red", "square", ["right"], segment_frames=2, height=16, width=16,
                                                seed=k) for k in range(16)])  # a new start position every chunk
    assert score_long_clip(restarts, [caption("red", "square", "right")] * 16, 2)["seam_ratio"] > 2.0
