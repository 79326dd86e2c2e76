"""What a request may ask for, and the check that turns raw client values into a `GenerationRequest`.

Every value a client sends (UI or API) passes through `validate_request` before anything reaches a pipeline. A bad
value raises `RequestError` naming the parameter and what is allowed, so the client reads e.g.
"num_frames must be an integer in [1, 32], got 'ten'" instead of a traceback.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

CACHE_NAMES = ("text_kv", "mask", "step", "prompt")
RANDOM_SEED = "random"
MAX_SEED = 2**32 - 1


class RequestError(ValueError):
    """A request value is missing, of the wrong type or out of range; the message names the parameter."""


@dataclass(frozen=True)
class Limits:
    """The ranges a server accepts. `frame_choices` / `size_choices` are what the model supports (UI dropdowns)."""

    frame_choices: tuple[int, ...] = (8, 16)
    size_choices: tuple[int, ...] = (32,)
    min_frames: int = 1
    max_frames: int = 16
    min_size: int = 8
    max_size: int = 32
    size_multiple: int = 8          # height and width must be multiples of VAE stride x patch size
    frame_multiple: int = 1         # Wan's VAE needs 4k + 1 frames; pixel patches take any count
    frame_offset: int = 0
    max_tokens: int = 4096          # bounds the work (and memory) one request can ask for
    tokens_per_frame_pixel: tuple[int, int, int] = (1, 8, 8)  # (t, h, w) divisors from pixels to tokens
    min_steps: int = 1
    max_steps: int = 100
    min_guidance: float = 1.0
    max_guidance: float = 20.0
    max_prompt_chars: int = 500
    attention_choices: tuple[str, ...] = ("dense",)
    default_attention: str = "dense"
    cache_choices: tuple[str, ...] = CACHE_NAMES
    default_cache: tuple[str, ...] = ()
    default_steps: int = 30
    default_guidance: float = 5.0
    default_frames: int = 16
    default_height: int = 32
    default_width: int = 32

    def token_count(self, num_frames: int, height: int, width: int) -> int:
        dt, dh, dw = self.tokens_per_frame_pixel
        return math.ceil(num_frames / dt) * (height // dh) * (width // dw)


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


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    """An int in [lo, hi]; integral floats (8.0, as JSON numbers often arrive) are accepted, 8.5 is not."""
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {_fmt(value)}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {_fmt(value)}") from None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {_fmt(value)}")
        value = int(value)
    if not isinstance(value, int):
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {type(value).__name__} {_fmt(value)}")
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {value}")
    return value


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {_fmt(value)}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {_fmt(value)}") from None
    if not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {type(value).__name__} {_fmt(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value}")
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value:g}")
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


def _seed(value: Any, rng: random.Random) -> int:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", RANDOM_SEED, "-1")):
        return rng.randint(0, MAX_SEED)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == -1:
        return rng.randint(0, MAX_SEED)
    try:
        return _integer("seed", value, 0, MAX_SEED)
    except RequestError:
        raise RequestError(f"seed must be \"random\" (or -1) or an integer in [0, {MAX_SEED}], got {_fmt(value)}") from None


def _cache(value: Any, limits: Limits) -> tuple[str, ...]:
    """None -> the pipeline's default caches; [] -> no cache."""
    choices = limits.cache_choices
    if value is None:
        return limits.default_cache
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RequestError(f"cache must be a list of names from {list(choices)}, got {type(value).__name__} {_fmt(value)}")
    names = []
    for item in value:
        if not isinstance(item, str) or item not in choices:
            raise RequestError(f"cache: unknown cache {_fmt(item)}; choose from {list(choices)}")
        if item not in names:
            names.append(item)
    return tuple(names)


def validate_request(limits: Limits, *, prompt: Any, negative_prompt: Any = None, seed: Any = RANDOM_SEED,
                     num_inference_steps: Any = 30, guidance_scale: Any = 5.0, num_frames: Any = 16,
                     height: Any = 32, width: Any = 32, attention: Any = None, cache: Any = None,
                     rng: random.Random | None = None) -> GenerationRequest:
    """Check every value against `limits`; raise `RequestError` naming the first bad parameter."""
    prompt_text = _text("prompt", prompt, limits.max_prompt_chars, required=True)
    negative_text = _text("negative_prompt", negative_prompt, limits.max_prompt_chars, required=False)
    steps = _integer("num_inference_steps", num_inference_steps, limits.min_steps, limits.max_steps)
    guidance = _number("guidance_scale", guidance_scale, limits.min_guidance, limits.max_guidance)
    frames = _integer("num_frames", num_frames, limits.min_frames, limits.max_frames)
    if (frames - limits.frame_offset) % limits.frame_multiple:
        raise RequestError(f"num_frames must be {limits.frame_multiple}k + {limits.frame_offset} "
                           f"in [{limits.min_frames}, {limits.max_frames}], got {frames}")
    h = _integer("height", height, limits.min_size, limits.max_size)
    w = _integer("width", width, limits.min_size, limits.max_size)
    for name, v in (("height", h), ("width", w)):
        if v % limits.size_multiple:
            raise RequestError(f"{name} must be a multiple of {limits.size_multiple} in "
                               f"[{limits.min_size}, {limits.max_size}], got {v}")
    tokens = limits.token_count(frames, h, w)
    if tokens > limits.max_tokens:
        raise RequestError(f"num_frames x height x width = {frames} x {h} x {w} is {tokens} tokens; this server "
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
        attention_is_default=attention == limits.default_attention,
    )



def limits_for(pipe: Any, device: str = "cpu", *, max_tokens: int | None = None, max_steps: int = 100,
               max_prompt_chars: int = 500) -> Limits:
    """What this server accepts for `pipe` on `device`: the pipeline's own ranges (`pipe.limits()`), the sparse
    attention backends that can run on `device`, and two server bounds on the work per request (tokens, steps)."""
    from vdiff.attention import available

    lim = pipe.limits()
    frames, side = lim["num_frames"], lim["height"]
    if lim["width"]["multiple_of"] != side["multiple_of"]:
        raise ValueError("the server needs the same pixel multiple for height and width")
    multiple = side["multiple_of"]
    tokens_div = (pipe.vae.stride[0] * pipe.transformer.config.patch_size[0], multiple, multiple)
    if max_tokens is None:
        max_tokens = 80_000 if str(device).startswith("cuda") else 4096  # 720p x 81 frames is 75,600 tokens
    wan_frames = "k+1" in frames["rule"]
    frame_multiple, frame_offset = (tokens_div[0], 1) if wan_frames else (tokens_div[0], 0)
    d_frames, d_side = frames["default"], max(lim["height"]["default"], lim["width"]["default"])

    def tokens(f: int, s: int) -> int:
        return math.ceil(f / tokens_div[0]) * (s // multiple) ** 2

    max_size = min(side["max"], lim["width"]["max"])
    size_choices = sorted({s for s in (d_side // 2, d_side, d_side * 3 // 2, d_side * 2)
                           if s % multiple == 0 and side["min"] <= s <= max_size and tokens(frames["min"], s) <= max_tokens}
                          | {d_side})
    frame_choices = sorted({f for f in (d_frames // 2, d_frames, d_frames * 2)
                            if frames["min"] <= f <= frames["max"] and (f - frame_offset) % frame_multiple == 0
                            and tokens(f, min(size_choices)) <= max_tokens} | {d_frames})
    sparse = [name for name, status in available(device).items() if status.sparse and status.available]
    configured = pipe.config.attention.backend
    return Limits(
        frame_choices=tuple(frame_choices), size_choices=tuple(size_choices),
        min_frames=frames["min"], max_frames=frames["max"], min_size=side["min"], max_size=max_size,
        size_multiple=multiple, frame_multiple=frame_multiple, frame_offset=frame_offset, max_tokens=max_tokens,
        tokens_per_frame_pixel=tokens_div, max_steps=min(max_steps, lim["num_inference_steps"]["max"]),
        min_guidance=float(lim["guidance_scale"]["min"]), max_guidance=float(lim["guidance_scale"]["max"]),
        max_prompt_chars=max_prompt_chars, attention_choices=tuple(dict.fromkeys(["dense", configured, *sparse])),
        default_attention=configured, cache_choices=tuple(lim["cache"]["allowed"]),
        default_cache=tuple(lim["cache"]["default"]), default_steps=lim["num_inference_steps"]["default"],
        default_guidance=float(lim["guidance_scale"]["default"]), default_frames=d_frames,
        default_height=lim["height"]["default"], default_width=lim["width"]["default"],
    )
