"""What a pipeline accepts, as data: `GenerationLimits` (frames, sides, steps, guidance, token count, defaults).

    lim = pipe.limits                 # built once per pipeline from its VAE, patch size and RoPE table
    lim.frames                        # tiny preset: Span(min=1, max=256, multiple=1), i.e. min + k * multiple
    lim.height.multiple               # 8 = VAE stride x patch size
    lim.token_count(16, 32, 32)       # 256 transformer tokens (16 x 4 x 4)
    lim.check(6, 32, 32, 30, 5.0)     # ValueError naming the argument, its rule and the nearest valid values

The rules come from three places and are combined here once: the VAE says which pixel frame counts it encodes
(`vae.frame_rule`: a multiple of the temporal stride for pixel patches, 4k+1 for Wan's causal VAE), the temporal patch
size says how many latent frames make one token frame, and the RoPE table bounds the token grid on every axis. The
server (`serve.validation`) reads the same object, so a rule is never re-derived from its wording.

No torch here: importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_STEPS = 1000
MAX_GUIDANCE = 50.0


@dataclass(frozen=True)
class FrameRule:
    """The pixel frame counts a VAE encodes: offset + k * multiple for k >= 0, and at least 1."""

    multiple: int
    offset: int = 0

    @property
    def first(self) -> int:
        """The smallest count the VAE takes."""
        return self.offset if self.offset >= 1 else self.multiple

    @property
    def text(self) -> str:
        return f"a multiple of {self.multiple}" if self.offset == 0 else f"{self.multiple}k+{self.offset}"


@dataclass(frozen=True)
class Span:
    """The integers min + k * multiple (k >= 0) that are <= max."""

    min: int
    max: int
    multiple: int = 1

    @property
    def offset(self) -> int:
        """Valid values are offset modulo `multiple` (Wan frames: 1 modulo 4)."""
        return self.min % self.multiple

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return self.min <= value <= self.max and (value - self.min) % self.multiple == 0

    def nearest(self, value: int) -> list[int]:
        """The valid values just below and just above `value` (one when they coincide or one side is empty)."""
        m = self.multiple
        x, y = min(value, self.max), max(value, self.min)
        below = self.min + (x - self.min) // m * m if x >= self.min else None
        above = self.min - (self.min - y) // m * m if y <= self.max else None  # ceil onto the grid
        if above is not None and above > self.max:
            above = None
        return list(dict.fromkeys(v for v in (below, above) if v is not None))


@dataclass(frozen=True)
class GenerationLimits:
    """What `VideoPipeline.__call__` accepts, and what it uses when an argument is left None."""

    frames: Span
    frame_rule: str  # the frames rule in words ("4k+1", "a multiple of 4 giving ..."), for messages and pages
    height: Span
    width: Span
    default_frames: int
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    steps: Span = Span(1, MAX_STEPS)
    guidance: tuple[float, float] = (0.0, MAX_GUIDANCE)  # <= 1 disables classifier-free guidance

    @classmethod
    def build(cls, vae: Any, patch_size: tuple[int, int, int], rope_max_seq_len: int, config: Any) -> GenerationLimits:
        """Combine the VAE's frame rule and strides, the transformer's patch size and RoPE table, and the pipeline
        config's defaults and optional caps (`max_num_frames`, `max_height`, `max_width`).

        Frames: the VAE takes rule.first + k * rule.multiple pixel frames, one more latent frame per step of k; a
        count is valid when its latent frames fill whole temporal patches and the token frames fit the RoPE table."""
        rule: FrameRule = vae.frame_rule
        pt = patch_size[0]
        _, sh, sw = vae.stride
        latent0 = vae.latent_shape(rule.first, sh, sw)[0]
        pad = -latent0 % pt  # steps of k until the latent frames are a multiple of pt
        lo = rule.first + pad * rule.multiple
        multiple = rule.multiple * pt
        hi = lo + (rope_max_seq_len - (latent0 + pad) // pt) * multiple
        cap = config.max_num_frames
        if cap:
            if cap < lo:
                raise ValueError(f"max_num_frames={cap} is below the smallest frame count this model takes ({lo})")
            hi = lo + (min(cap, hi) - lo) // multiple * multiple
        frame_rule = rule.text + (f" giving a latent frame count that is a multiple of {pt}" if pt > 1 else "")

        sides = []
        for axis, cap in ((1, config.max_height), (2, config.max_width)):
            m = vae.stride[axis] * patch_size[axis]
            sides.append(Span(m, cap // m * m if cap else m * rope_max_seq_len, m))
        return cls(frames=Span(lo, hi, multiple), frame_rule=frame_rule, height=sides[0], width=sides[1],
                   default_frames=config.num_frames, default_height=config.height, default_width=config.width,
                   default_steps=config.num_inference_steps, default_guidance=config.guidance_scale)

    def token_count(self, num_frames: int, height: int, width: int) -> int:
        """Transformer tokens of one video of a valid size (token frames x token rows x token columns)."""
        token_frames = -(-num_frames // self.frames.multiple)
        return token_frames * (height // self.height.multiple) * (width // self.width.multiple)

    def check(self, num_frames: Any, height: Any, width: Any, num_inference_steps: Any, guidance_scale: Any) -> None:
        """Raise ValueError for the first argument outside its rule, naming it, the rule and the nearest valid ones."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int):
            raise ValueError(f"num_frames must be an int, got {num_frames!r}")
        f = self.frames
        if num_frames not in f:
            near = " or ".join(str(v) for v in f.nearest(num_frames))
            raise ValueError(f"num_frames={num_frames} is not allowed: must be {self.frame_rule} in [{f.min}, {f.max}]"
                             f"; nearest valid: {near}")
        for name, value, side in (("height", height, self.height), ("width", width, self.width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value not in side:
                near = " or ".join(str(v) for v in side.nearest(value))
                raise ValueError(f"{name}={value} is not allowed: must be a multiple of {side.multiple} in "
                                 f"[{side.min}, {side.max}] (VAE stride x patch size); nearest valid: {near}")
        if num_inference_steps not in self.steps:
            raise ValueError(f"num_inference_steps must be an int in [{self.steps.min}, {self.steps.max}], "
                             f"got {num_inference_steps!r}")
        lo, hi = self.guidance
        g = guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not lo <= g <= hi:
            raise ValueError(f"guidance_scale must be a number in [{lo:g}, {hi}] (<= 1 disables guidance), got {g!r}")
