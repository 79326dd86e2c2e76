"""What a request may ask for, and the check that turns raw client values into a `GenerationRequest`.

Every value a client sends (UI or API) passes through `validate_request` before anything reaches a pipeline. A bad
value raises `RequestError` naming the parameter and what is allowed, so the client reads e.g.
"num_frames must be an integer in [1, 32], got 'ten'" instead of a traceback.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from vdiff.limits import GenerationLimits, Span

RANDOM_SEED = "random"
MAX_SEED = 2**32 - 1
# The server's own bounds on one request, on top of what the pipeline accepts (`./launch.sh serve --help`).
DEFAULT_MAX_STEPS = 100
DEFAULT_MAX_PROMPT_CHARS = 500
DEFAULT_MAX_TOKENS = {"cuda": 80_000, "cpu": 4096}  # 720p x 81 frames is 75,600 tokens
DEFAULT_MAX_CHUNKS = 64  # a causal model's longest video per request, in chunks (`--max-chunks`)
DISPLAY_MIN_SIDE = 256  # previews of smaller models are upscaled (nearest neighbour) to at least this shorter side


class RequestError(ValueError):
    """A request value is missing, of the wrong type or out of range; the message names the parameter, and `param`
    holds that name (given, or the message's first word: every message here starts with it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", message)
        self.param = param or (match.group(0) if match else None)


def _cache_names() -> tuple[str, ...]:
    """Every cache vdiff has. Imported when a Limits is built, not with this module: vdiff.cache loads diffusers,
    and `python -m serve --help` reads this module's defaults."""
    from vdiff.cache import CACHE_NAMES

    return CACHE_NAMES


@dataclass(frozen=True)
class Limits:
    """What this server accepts: the pipeline's own rules and defaults (`generation`, from `VideoPipeline.limits`)
    narrowed by the server's bounds on the work of one request, plus what the page offers in its dropdowns."""

    generation: GenerationLimits
    frame_choices: tuple[int, ...] = ()  # UI dropdowns: sizes the model supports and max_tokens allows
    size_choices: tuple[int, ...] = ()
    max_tokens: int = DEFAULT_MAX_TOKENS["cpu"]  # bounds the work (and memory) one request can ask for
    max_steps: int = DEFAULT_MAX_STEPS
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    attention_choices: tuple[str, ...] = ("dense",)
    default_attention: str = "dense"
    cache_choices: tuple[str, ...] = field(default_factory=_cache_names)
    default_cache: tuple[str, ...] = ()
    # A causal (long-video) model: pixel frames per chunk, chunks one chunk attends (None: all), the server's bound
    chunk_frames: int = 0  # 0: not causal
    attended_chunks: int | None = None
    max_chunks: int = DEFAULT_MAX_CHUNKS
    display_scale: int = 1  # integer nearest-neighbour upscale of the page's previews (the original stays)

    @property
    def causal(self) -> bool:
        return self.chunk_frames > 0

    @property
    def steps(self) -> Span:
        g = self.generation.steps
        return Span(g.min, min(self.max_steps, g.max))

    @property
    def sides(self) -> Span:
        return _sides(self.generation)


def _sides(g: GenerationLimits) -> Span:
    """One range for height and width: the page offers one list of sizes for both."""
    if g.height.multiple != g.width.multiple:
        raise ValueError("the server needs the same pixel multiple for height and width")
    return Span(max(g.height.min, g.width.min), min(g.height.max, g.width.max), g.height.multiple)


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: every field is of the right type and in range."""

    prompt: str
    negative_prompt: str | None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    num_frames: int
    height: int
    width: int
    attention: str
    cache: tuple[str, ...] = ()
    attention_is_default: bool = False  # the pipeline's configured attention (with its options) is used as is
    num_chunks: int | None = None  # a causal model's request: num_frames = num_chunks x frames per chunk
    prompts: tuple[tuple[int, str], ...] = ()  # prompt switches (chunk, prompt), ascending

    @property
    def causal(self) -> bool:
        return self.num_chunks is not None

    def stream_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `VideoPipeline.stream` (a causal request; same names)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "num_chunks": self.num_chunks, "prompts": dict(self.prompts), "height": self.height,
                "width": self.width, "cache": list(self.cache),
                "attention": None if self.attention_is_default else self.attention}

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `VideoPipeline.__call__` (same names)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "num_frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "attention": None if self.attention_is_default else self.attention,
            "cache": list(self.cache),
        }


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    """A number in [lo, hi], from a number or its text (JSON and form values arrive either way). With `integer`,
    integral floats (8.0) are accepted and returned as int, 8.5 is not."""
    kind, bounds = ("an integer", f"[{lo}, {hi}]") if integer else ("a number", f"[{lo:g}, {hi:g}]")

    def bad(got: Any, what: str = kind) -> RequestError:
        return RequestError(f"{name} must be {what} in {bounds}, got {got}")

    if isinstance(value, bool) or value is None:
        raise bad(_fmt(value))
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise bad(_fmt(value)) from None
    if not isinstance(value, (int, float)):
        raise bad(f"{type(value).__name__} {_fmt(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(_fmt(value), kind if integer else "a finite number")
    if integer:
        if value != int(value):
            raise bad(_fmt(value))
        value = int(value)
    else:
        value = float(value)
    if not lo <= value <= hi:
        raise bad(value if integer else f"{value:g}")
    return value


def _text(name: str, value: Any, max_chars: int, *, required: bool) -> str | None:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string of at most {max_chars} characters, got {type(value).__name__}")
    value = value.strip()
    if "\x00" in value:
        raise RequestError(f"{name} must not contain NUL characters")
    if required and not value:
        raise RequestError(f"{name} must not be empty: describe the video to generate (1 to {max_chars} characters)")
    if len(value) > max_chars:
        raise RequestError(f"{name} is too long: {len(value)} characters, the limit is {max_chars}")
    return value or None


def check_prompt(limits: Limits, value: Any, name: str = "prompt") -> str:
    """A prompt as a request's (1 to max_prompt_chars characters, stripped), e.g. a mid-stream prompt change."""
    return _text(name, value, limits.max_prompt_chars, required=True) or ""


def _seed(value: Any, rng: random.Random) -> int:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", RANDOM_SEED, "-1")):
        return rng.randint(0, MAX_SEED)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == -1:
        return rng.randint(0, MAX_SEED)
    try:
        return _number("seed", value, 0, MAX_SEED, integer=True)
    except RequestError:
        raise RequestError(f"seed must be \"random\" (or -1) or an integer in [0, {MAX_SEED}], "
                           f"got {_fmt(value)}") from None


def _cache(value: Any, limits: Limits) -> tuple[str, ...]:
    """None -> the pipeline's default caches; [] -> no cache."""
    choices = limits.cache_choices
    if value is None:
        return limits.default_cache
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RequestError(f"cache must be a list of names from {list(choices)}, "
                           f"got {type(value).__name__} {_fmt(value)}")
    names = []
    for item in value:
        if not isinstance(item, str) or item not in choices:
            raise RequestError(f"cache: unknown cache {_fmt(item)}; choose from {list(choices)}")
        if item not in names:
            names.append(item)
    return tuple(names)


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()  # an argument left out: the pipeline's default (an explicit None is a bad value)


def _chunks(limits: Limits, num_chunks: Any, num_frames: Any) -> tuple[int | None, int]:
    """(num_chunks, num_frames) of a request: a causal model takes either (frames = chunks x frames per chunk)."""
    g, per = limits.generation, limits.chunk_frames
    if not limits.causal:
        if num_chunks is not DEFAULT:
            raise RequestError("num_chunks: the served model is not causal (it generates whole clips); leave it out "
                               "and ask for num_frames")
        frames = _number("num_frames", g.default_frames if num_frames is DEFAULT else num_frames, g.frames.min,
                         g.frames.max, integer=True)
        if frames not in g.frames:
            raise RequestError(f"num_frames must be {g.frames.multiple}k + {g.frames.offset} "
                               f"in [{g.frames.min}, {g.frames.max}], got {frames}")
        return None, frames
    if num_chunks is not DEFAULT:
        chunks = _number("num_chunks", num_chunks, 1, limits.max_chunks, integer=True)
        if num_frames is not DEFAULT and num_frames != chunks * per:
            raise RequestError(f"num_frames={_fmt(num_frames)} disagrees with num_chunks={chunks} ({per} frames per "
                               f"chunk): give one of them")
        return chunks, chunks * per
    frames = _number("num_frames", g.default_frames if num_frames is DEFAULT else num_frames, per,
                     per * limits.max_chunks, integer=True)
    if frames % per:
        raise RequestError(f"num_frames must be a multiple of {per} (frames per chunk) in [{per}, "
                           f"{per * limits.max_chunks}], got {frames}")
    return frames // per, frames


def _switches(value: Any, num_chunks: int | None, max_chars: int) -> tuple[tuple[int, str], ...]:
    """Prompt switches {chunk: prompt} (JSON keys arrive as strings) -> ((chunk, prompt), ...), ascending."""
    if value is None or value == {}:
        return ()
    if num_chunks is None:
        raise RequestError("prompts: the served model is not causal (one prompt per clip); leave it out")
    if not isinstance(value, dict):
        raise RequestError(f"prompts must be an object {{chunk index: prompt}}, got {type(value).__name__}")
    out = {}
    for key, text in value.items():
        if isinstance(key, int) and not isinstance(key, bool):
            chunk = key
        else:
            chunk = int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if chunk is None or not 0 <= chunk < num_chunks:
            raise RequestError(f"prompts: keys must be chunk indices in [0, {num_chunks - 1}], got {_fmt(key)}")
        out[chunk] = _text(f"prompts[{chunk}]", text, max_chars, required=True)
    return tuple(sorted(out.items()))


def validate_request(limits: Limits, *, prompt: Any, negative_prompt: Any = None, seed: Any = RANDOM_SEED,
                     num_inference_steps: Any = DEFAULT, guidance_scale: Any = DEFAULT, num_frames: Any = DEFAULT,
                     height: Any = DEFAULT, width: Any = DEFAULT, attention: Any = None, cache: Any = None,
                     num_chunks: Any = DEFAULT, prompts: Any = None,
                     rng: random.Random | None = None) -> GenerationRequest:
    """Check every value against `limits`; raise `RequestError` naming the first bad parameter."""
    g = limits.generation

    def given(value: Any, default: Any) -> Any:
        return default if value is DEFAULT else value

    prompt_text = _text("prompt", prompt, limits.max_prompt_chars, required=True)
    negative_text = _text("negative_prompt", negative_prompt, limits.max_prompt_chars, required=False)
    steps = _number("num_inference_steps", given(num_inference_steps, g.default_steps), limits.steps.min,
                    limits.steps.max, integer=True)
    guidance = _number("guidance_scale", given(guidance_scale, g.default_guidance), *g.guidance)
    chunks, frames = _chunks(limits, num_chunks, num_frames)
    switches = _switches(prompts, chunks, limits.max_prompt_chars)
    sides = limits.sides
    h = _number("height", given(height, g.default_height), sides.min, sides.max, integer=True)
    w = _number("width", given(width, g.default_width), sides.min, sides.max, integer=True)
    for name, v in (("height", h), ("width", w)):
        if v not in sides:
            raise RequestError(f"{name} must be a multiple of {sides.multiple} in [{sides.min}, {sides.max}], got {v}")
    # the work of one forward: the whole clip, or for a causal model the chunks one chunk attends
    attended = frames if chunks is None else limits.chunk_frames * min(chunks, limits.attended_chunks or chunks)
    tokens = g.token_count(attended, h, w)
    if tokens > limits.max_tokens:
        what = "num_frames x height x width" if chunks is None else "attended frames x height x width"
        raise RequestError(f"{what} = {attended} x {h} x {w} is {tokens} tokens; this server "
                           f"allows at most {limits.max_tokens}: ask for fewer frames or a smaller size")
    if attention is None or attention == "":
        attention = limits.default_attention
    if not isinstance(attention, str) or attention not in limits.attention_choices:
        raise RequestError(f"attention must be one of {list(limits.attention_choices)} (the backends that can run "
                           f"on this server), got {_fmt(attention)}")
    return GenerationRequest(
        prompt=prompt_text or "", negative_prompt=negative_text, seed=_seed(seed, rng or random.Random()),
        num_inference_steps=steps, guidance_scale=guidance, num_frames=frames, height=h, width=w,
        attention=attention, cache=_cache(cache, limits),
        attention_is_default=attention == limits.default_attention, num_chunks=chunks, prompts=switches,
    )


def display_scale_for(height: int, width: int, scale: int | None = None) -> int:
    """The page's integer upscale: `scale` when given (>= 1), else the least factor that brings the shorter side to
    DISPLAY_MIN_SIDE for clips below 128 px (1 otherwise)."""
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= 64:
            raise ValueError(f"display_scale must be an integer in [1, 64], got {scale!r}")
        return scale
    side = min(height, width)
    return 1 if side >= 128 else -(-DISPLAY_MIN_SIDE // side)


def limits_for(pipe: Any, device: str = "cpu", *, max_tokens: int | None = None, max_steps: int = DEFAULT_MAX_STEPS,
               max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, max_chunks: int = DEFAULT_MAX_CHUNKS,
               display_scale: int | None = None) -> Limits:
    """What this server accepts for `pipe` on `device`: the pipeline's own rules (`pipe.limits`), its enabled caches,
    the sparse attention backends that can run on `device`, and the server's bounds on the work per request
    (tokens per forward, steps, and for a causal model chunks per video)."""
    from vdiff.attention import available

    g: GenerationLimits = pipe.limits
    sides = _sides(g)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS["cuda" if str(device).startswith("cuda") else "cpu"]
    d_frames, d_side = g.default_frames, max(g.default_height, g.default_width)
    size_choices = sorted({s for s in (d_side // 2, d_side, d_side * 3 // 2, d_side * 2)
                           if s in sides and g.token_count(g.frames.min, s, s) <= max_tokens} | {d_side})
    smallest = min(size_choices)
    frame_choices = sorted({f for f in (d_frames // 2, d_frames, d_frames * 2)
                            if f in g.frames and g.token_count(f, smallest, smallest) <= max_tokens} | {d_frames})
    sparse = [name for name, status in available(device).items() if status.sparse and status.available]
    configured = pipe.config.attention.backend
    causal = getattr(pipe.transformer, "causal_config", None)
    if causal is not None:
        sparse = [name for name in sparse if name != "vmoba"]  # refuses a causal model (vdiff.attention.vmoba)
    if isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1:
        raise ValueError(f"max_chunks must be an integer >= 1, got {max_chunks!r}")
    return Limits(
        generation=g, frame_choices=tuple(frame_choices), size_choices=tuple(size_choices), max_tokens=max_tokens,
        max_steps=min(max_steps, g.steps.max), max_prompt_chars=max_prompt_chars,
        attention_choices=tuple(dict.fromkeys(["dense", configured, *sparse])), default_attention=configured,
        default_cache=tuple(pipe.caches),
        chunk_frames=pipe.chunk_pixel_frames if causal is not None else 0,
        attended_chunks=(None if causal is None or causal.window_chunks is None
                         else causal.sink_chunks + causal.window_chunks + 1),
        max_chunks=max_chunks, display_scale=display_scale_for(g.default_height, g.default_width, display_scale),
    )
