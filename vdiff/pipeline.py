"""VideoPipeline: text -> video with a VideoDiT, a text encoder, a VAE and a diffusers flow-matching scheduler.

    from vdiff import VideoPipeline
    pipe = VideoPipeline.from_pretrained("checkpoints/shapes-tiny")
    out = pipe("a red circle moving right", num_frames=16, height=32, width=32, num_inference_steps=30,
               guidance_scale=5.0, seed=0, attention="radial", cache=["text_kv"])
    out.frames          # numpy uint8 (T, H, W, 3); batched prompts: out.videos (B, T, H, W, 3), frames = videos[0]
    out.save("clip.mp4")   # .mp4, .gif or .webm
    out.stats           # timings, attention density, cache hits / misses
    pipe.limits         # GenerationLimits: what each argument may be and its default (vdiff.limits)

Folder layout (`save_pretrained` / `from_pretrained`):
    vdiff.json (or vdiff.yaml)   PipelineConfig: defaults (frames, size, steps, guidance, attention, caches, ...)
    transformer/                 VideoDiT (diffusers format, safetensors; a WanTransformer3DModel folder loads too)
    vae/                         PixelPatchVAE (vae_config.json) or AutoencoderKLWan (diffusers config.json)
    scheduler/                   diffusers scheduler config (UniPC with flow sigmas, or FlowMatchEuler); required
    text_encoder/ tokenizer/     only when config.text_encoder names a subfolder ("minilm" = the packaged encoder)
A Wan2.1 diffusers folder (model_index.json, no vdiff.json) loads as is, with Wan's defaults (81 x 480 x 832,
50 steps, guidance 5, UMT5 from text_encoder/ + tokenizer/, 512 tokens). The files are read and written by
vdiff.pipeline_io; this module wires the components and samples.

Calls are thread-safe: each builds its own scheduler and its own cache state (vdiff.cache.cache_context).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vdiff.attention import AttentionStats, BackendUnavailable, check_config
from vdiff.cache import CACHE_NAMES, CacheConfig, apply_cache, cache_config, cache_context, no_mask_cache, remove_cache
from vdiff.config import AttentionConfig, ConfigError, ModelConfig, from_dict, to_dict
from vdiff.diffusion.sampling import Cancelled, denoise, fresh_scheduler, make_scheduler, sampler_name
from vdiff.limits import GenerationLimits
from vdiff.lora import LORA_WEIGHT_NAME, LoraPipelineMixin
from vdiff.models.dit import VideoDiT
from vdiff.models.text import HFTextEncoder, minilm_text_encoder
from vdiff.models.vae import PixelPatchVAE, WanVAE, load_vae
from vdiff.outputs import PipelineStats, VideoOutput
from vdiff.parallel.inference import ParallelConfig, ParallelRuntime, parallel_device
from vdiff.parallel.spawn import FOLLOWER_ENV, dispatched, rank_device, spawn_group
from vdiff.parallel.vae import check_vae_folder, split_halo
from vdiff.pipeline_io import (
    PipelineConfig,
    atomic_folder,
    load_scheduler,
    read_config,
    to_uint8,
    write_config,
    write_video,
)

# to_uint8 and write_video live in vdiff.pipeline_io; they stay importable from here for existing callers.
if TYPE_CHECKING:
    from vdiff.streaming import VideoChunk

__all__ = ["Cancelled", "GenerationLimits", "PipelineConfig", "PipelineStats", "VideoOutput", "VideoPipeline",
           "to_uint8", "write_video"]


class VideoPipeline(LoraPipelineMixin):
    """Text encoder, transformer, scheduler and VAE behind one call. What a call accepts is `self.limits`, built
    once here from the components, so the checks, the error messages and the server all read the same numbers."""

    def __init__(
        self,
        transformer: VideoDiT,
        text_encoder: Any,  # .encode(list[str]) -> TextEmbeddings, .dim (HFTextEncoder)
        vae: PixelPatchVAE | WanVAE,
        scheduler: Any = None,  # a diffusers flow scheduler (template; every call builds a fresh one); default UniPC
        config: PipelineConfig | None = None,
        parallel: ParallelConfig | None = None,  # several processes per video (vdiff.parallel.inference)
    ):
        self.transformer = transformer.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler if scheduler is not None else make_scheduler("unipc", 3.0)
        sampler_name(self.scheduler)
        self.config = config or PipelineConfig()
        mc = transformer.config
        if mc.in_channels != vae.latent_channels:
            raise ValueError(f"transformer.in_channels={mc.in_channels} does not match the VAE's "
                             f"{vae.latent_channels} latent channels")
        if mc.text_dim != text_encoder.dim:
            raise ValueError(f"transformer.text_dim={mc.text_dim} does not match the text encoder's dim "
                             f"{text_encoder.dim}")
        self.limits = GenerationLimits.build(vae, tuple(mc.patch_size), mc.rope_max_seq_len, self.config)
        self._lock = threading.Lock()
        self._installed: dict[str, CacheConfig] = {}  # hooks on the model now
        self._defaults: list[str] = []  # caches used when a call passes cache=None
        if parallel is not None and parallel.vae > 1:
            split_halo(vae)  # a VAE that cannot be split is refused here, not after the denoising
        self.parallel = ParallelRuntime(parallel, self.transformer) if parallel is not None else None
        for name in self.config.cache:
            self.enable_cache(name)

    # ---------------------------------------------------------------------------------------------------------------
    # Construction, saving, loading
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_model_config(cls, model_config: ModelConfig, *, text_encoder: Any = None, vae: Any = None,
                          scheduler: Any = None, config: PipelineConfig | None = None, seed: int = 0) -> VideoPipeline:
        """A pipeline around a randomly initialised VideoDiT (tests, benchmarks, smoke tests).

        Defaults: the packaged MiniLM text encoder and a PixelPatchVAE whose stride matches in_channels
        (48 channels -> stride (1, 4, 4), as the tiny preset)."""
        config = config or PipelineConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = VideoDiT.from_model_config(model_config)
        if text_encoder is None:
            text_encoder = minilm_text_encoder(config.text_max_length)
        if vae is None:
            side = {48: 4, 12: 2, 3: 1}.get(model_config.in_channels)
            if side is None:
                raise ValueError(f"no default VAE for in_channels={model_config.in_channels}; pass vae=...")
            vae = PixelPatchVAE((1, side, side))
        return cls(transformer, text_encoder, vae, scheduler, config)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device | None = None,
                        torch_dtype: torch.dtype | None = None, parallel: ParallelConfig | None = None,
                        **config_overrides: Any) -> VideoPipeline:
        """Load a pipeline folder (vdiff layout or a Wan2.1 diffusers folder). `config_overrides` change
        PipelineConfig fields (e.g. `text_max_length=64`). `parallel`: see vdiff.parallel.inference (torchrun)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"pipeline folder not found: {path}")
        config = from_dict(PipelineConfig, read_config(path))
        if config_overrides:
            config = from_dict(PipelineConfig, config_overrides, base=config)
        dtype = torch_dtype or torch.float32
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(f"{path}: no transformer/ folder")
        scheduler = load_scheduler(path / "scheduler")  # before the weights: a folder without one fails at once
        leader = None
        if parallel is not None:
            spawn = parallel.launch == "spawn" and not os.environ.get(FOLLOWER_ENV)
            # bad degrees fail before the weights (and before any process starts)
            parallel.check_model(VideoDiT.load_config(path / "transformer"), parallel.size if spawn else None)
            check_vae_folder(path / "vae", parallel.vae)
            if spawn:
                load = {"torch_dtype": str(dtype).removeprefix("torch."), **config_overrides}
                leader = spawn_group(parallel, path, load)  # ranks 1..N-1 load this folder; this process is rank 0
                device = rank_device(parallel, 0)
            device = parallel_device() if device is None else device
        try:
            pipe = cls._load(path, config, scheduler, dtype, device, parallel)
        except BaseException:
            if leader is not None:
                leader.kill()
            raise
        if leader is not None:
            leader.attach()  # from here on, dispatched calls run on every rank
            pipe.parallel.leader = leader
        return pipe

    @classmethod
    def _load(cls, path: Path, config: PipelineConfig, scheduler: Any, dtype: torch.dtype,
              device: str | torch.device | None, parallel: ParallelConfig | None) -> VideoPipeline:
        transformer = VideoDiT.from_pretrained(path / "transformer", torch_dtype=dtype)
        if config.text_encoder == "minilm":
            text_encoder = minilm_text_encoder(config.text_max_length)
        else:
            text_encoder = HFTextEncoder.from_pretrained(
                path / config.text_encoder, config.text_max_length,
                tokenizer_path=path / config.tokenizer if config.tokenizer else None)
        vae = load_vae(path / "vae")
        pipe = cls(transformer, text_encoder, vae, scheduler, config, parallel)
        if config.lora:
            pipe.load_lora_weights(path / config.lora, scale=config.lora_scale)
        if device is not None:
            pipe.to(device)
        return pipe

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the pipeline folder (atomically: into a temporary folder, then renamed)."""
        cfg = self.config
        with atomic_folder(path) as tmp:
            lora = self._save_transformer(tmp)  # the base weights (+ the adapter file when one is active)
            cfg = dataclasses.replace(cfg, lora=LORA_WEIGHT_NAME if lora else None, lora_scale=lora[1] if lora else 1.0)
            self.vae.save_pretrained(tmp / "vae")
            self.scheduler.save_pretrained(tmp / "scheduler")
            if cfg.text_encoder != "minilm":
                self.text_encoder.model.save_pretrained(tmp / cfg.text_encoder)
                self.text_encoder.tokenizer.save_pretrained(tmp / (cfg.tokenizer or cfg.text_encoder))
            write_config(tmp, to_dict(cfg))
        return Path(path)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> VideoPipeline:
        """Move the transformer (and its dtype), the text encoder and the VAE to `device`."""
        if dtype is not None:
            self.transformer.to(device=device, dtype=dtype)
        elif device is not None:
            self.transformer.to(device)
        if device is not None:
            self.text_encoder.to(device)
            self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def chunk_pixel_frames(self) -> int:
        """Video frames of one chunk of a causal model (its chunk_frames latent frames, decoded on their own)."""
        causal = self.transformer.causal_config
        if causal is None:
            raise ValueError("stream needs a causal model (model.causal); this one generates whole clips")
        if not isinstance(self.vae, PixelPatchVAE):
            raise ValueError(f"stream decodes chunk by chunk, which needs a VAE without temporal context (the pixel "
                             f"VAE); {type(self.vae).__name__} is not supported for causal models yet")
        return causal.chunk_frames * self.vae.stride[0]

    def stream(self, prompt: str | Sequence[str], *, num_chunks: int | None = None, seed: int | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               prompts: dict[int, str] | None = None, cache: Sequence[str | CacheConfig] | None = None,
               callback: Callable[[int, int, torch.Tensor], Any] | None = None, negative_prompt: Any = None,
               height: int | None = None, width: int | None = None, attention: Any = None,
               sampler: str | None = None, shift: float | None = None, switch_guidance: float | None = None,
               switch_guidance_chunks: int | None = None, progress: bool = False) -> Iterator[VideoChunk]:
        """Generate a causal model's video chunk by chunk (vdiff.streaming): yields `VideoChunk`s (`.index`,
        `.frames` uint8 (t, H, W, 3), `.stats`). num_chunks None: until the caller stops iterating. prompts={k: text}
        switches the prompt at chunk k; entries added while iterating take effect at their chunk if it has not
        started (live steering). attention, sampler, shift: as for __call__ (every chunk). cache: None = the
        pipeline's caches (with causal_kv: each chunk attends to stored K/V); a list without causal_kv recomputes the
        whole history at every step (the reference). switch_guidance g > 1 (default: the pipeline config's): for
        switch_guidance_chunks chunks after a switch, each step runs the model under the old prompt too (its own K/V
        cache, not re-cached) and uses v_old + g (v_new - v_old), so the new prompt takes over faster."""
        from vdiff.pipeline_io import check_switch_guidance
        from vdiff.streaming import check_stream_args, stream_chunks

        switches = check_stream_args(num_chunks, prompts)
        switch_guidance = self.config.switch_guidance if switch_guidance is None else switch_guidance
        if switch_guidance_chunks is None:
            switch_guidance_chunks = self.config.switch_guidance_chunks
        check_switch_guidance(switch_guidance, switch_guidance_chunks)
        leader = getattr(self.parallel, "leader", None)
        if leader is not None and not leader.in_call() and not leader.streaming:  # a spawned group's leader
            request = dict(prompt=prompt, num_chunks=num_chunks, seed=seed, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, prompts=prompts, cache=cache, callback=callback,
                           negative_prompt=negative_prompt, height=height, width=width, attention=attention,
                           sampler=sampler, shift=shift, switch_guidance=switch_guidance,
                           switch_guidance_chunks=switch_guidance_chunks, progress=progress)
            return leader.stream(lambda: self.stream(**request), request)  # the followers iterate it too

        def resolve() -> _CallArgs:
            a = self._resolve(prompt, negative_prompt, self.chunk_pixel_frames, height, width, num_inference_steps,
                              guidance_scale, seed, attention, cache, callback, sampler, shift)
            if "step" in a.caches:
                raise ValueError("cache: the step cache does not apply to chunk-by-chunk generation; leave 'step' "
                                 "out")
            return a if self.parallel is None else self.parallel.check_decode(a, self.vae)

        if self.parallel is not None:  # every rank runs the same stream (cfg=2: each rank one branch)
            extra = {"num_chunks": num_chunks, "prompts": {str(k): v for k, v in sorted(switches.items())},
                     "switch_guidance": [float(switch_guidance), switch_guidance_chunks]}
            a = self.parallel.agree(resolve, seed_given=seed is not None, extra=extra)
        else:
            a = resolve()
        kv = a.cache_configs.get("causal_kv") or self._installed.get("causal_kv")
        commit = kv.commit if "causal_kv" in a.caches and kv is not None else None
        return stream_chunks(self, a, num_chunks=num_chunks, switches=switches, context_noise=self.config.context_noise,
                             commit=commit, attention_stats=AttentionStats(), callback=callback, progress=progress,
                             external=kv.external if commit is not None else "off",
                             switch_guidance=(float(switch_guidance), switch_guidance_chunks))

    # ---------------------------------------------------------------------------------------------------------------
    # Caches
    # ---------------------------------------------------------------------------------------------------------------

    @dispatched
    def enable_cache(self, cache: str | CacheConfig) -> None:
        """Install a cache hook and use it in every call that passes cache=None (name or config object)."""
        cfg = cache_config(cache)
        self._install(cfg, replace=True)
        if cfg.name not in self._defaults:
            self._defaults.append(cfg.name)

    @dispatched
    def disable_cache(self, name: str | None = None) -> None:
        """Remove one cache hook (or all, with None)."""
        names = list(self._installed) if name is None else [cache_config(name).name]
        with self._lock:
            for n in names:
                if n in self._installed:
                    remove_cache(self._target(n), n)
                    del self._installed[n]
                if n in self._defaults:
                    self._defaults.remove(n)

    @property
    def caches(self) -> list[str]:
        """Caches used by calls that pass cache=None."""
        return list(self._defaults)

    def _target(self, name: str) -> Any:
        return self.text_encoder if name == "prompt" else self.transformer

    def _install(self, cfg: CacheConfig, replace: bool) -> None:
        with self._lock:
            if cfg.name in self._installed and not replace:
                return
            apply_cache(self._target(cfg.name), cfg)
            self._installed[cfg.name] = cfg

    def _resolve_caches(self, cache: Any) -> tuple[frozenset[str], dict[str, CacheConfig]]:
        if cache is None:
            return frozenset(self._defaults), {}
        specs = [cache] if isinstance(cache, str) or dataclasses.is_dataclass(cache) else cache
        if not isinstance(specs, (list, tuple)):
            raise ValueError(f"cache: expected None, a list of names from {list(CACHE_NAMES)} or cache configs, "
                             f"got {cache!r}")
        names, configs = set(), {}
        for spec in specs:
            cfg = cache_config(spec)
            self._install(cfg, replace=False)
            names.add(cfg.name)
            if not isinstance(spec, str):
                configs[cfg.name] = cfg
        return frozenset(names), configs

    # ---------------------------------------------------------------------------------------------------------------
    # Arguments of a call
    # ---------------------------------------------------------------------------------------------------------------

    def _resolve(self, prompt: Any, negative_prompt: Any, num_frames: Any, height: Any, width: Any,
                 num_inference_steps: Any, guidance_scale: Any, seed: Any, attention: Any, cache: Any, callback: Any,
                 sampler: str | None, shift: float | None) -> _CallArgs:
        """Fill defaults and check every argument, in the order the errors are reported, before any work starts."""
        cfg = self.config
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        negative_prompt = cfg.negative_prompt if negative_prompt is None else negative_prompt
        if isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        elif isinstance(negative_prompt, Sequence) and all(isinstance(p, str) for p in negative_prompt):
            negatives = list(negative_prompt)
        else:
            raise ValueError(f"negative_prompt must be None, a string or a list of strings, got {negative_prompt!r}")
        lim = self.limits
        frames = lim.default_frames if num_frames is None else num_frames
        height = lim.default_height if height is None else height
        width = lim.default_width if width is None else width
        steps = lim.default_steps if num_inference_steps is None else num_inference_steps
        guidance = lim.default_guidance if guidance_scale is None else guidance_scale
        lim.check(frames, height, width, steps, guidance)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63 - 1], got {seed!r}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable(step_index, num_steps, latents) or None, got {callback!r}")
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: got {len(negatives)} negative prompts for {len(prompts)} prompts "
                             "(give one string, or a list of the same length)")
        att = self._attention(attention)
        scheduler = fresh_scheduler(self.scheduler, sampler, shift)
        enabled, cache_configs = self._resolve_caches(cache)
        return _CallArgs(prompts, negatives, frames, height, width, steps, float(guidance),
                         secrets.randbelow(2**31) if seed is None else seed, att, scheduler, enabled, cache_configs)

    def _attention(self, attention: Any) -> AttentionConfig:
        if attention is None:
            cfg = self.config.attention
        elif isinstance(attention, AttentionConfig):
            cfg = attention
        elif isinstance(attention, str):
            try:
                cfg = AttentionConfig.named(attention)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        elif isinstance(attention, dict):
            try:
                cfg = from_dict(AttentionConfig, attention, prefix="attention.")
            except ConfigError as err:
                raise ValueError(str(err)) from None
        else:
            raise ValueError(f"attention must be None, a backend name, an AttentionConfig or a dict, got {attention!r}")
        try:
            check_config(cfg, self.device)
        except BackendUnavailable as err:
            raise ValueError(f"attention: {err}") from None
        return cfg

    # ---------------------------------------------------------------------------------------------------------------
    # Sampling
    # ---------------------------------------------------------------------------------------------------------------

    @dispatched
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        attention: str | AttentionConfig | dict | None = None,
        cache: Sequence[str | CacheConfig] | None = None,
        callback: Callable[[int, int, torch.Tensor], Any] | None = None,
        *,
        sampler: str | None = None,
        shift: float | None = None,
        progress: bool = False,
    ) -> VideoOutput:
        """Generate one video per prompt.

        Arguments left None take the pipeline config's defaults (`pipe.limits` holds ranges and defaults).
        negative_prompt: None = the config's (default ""); a string for every prompt, or one per prompt.
        seed: None = random (reported as out.seed); the same seed gives the same video.
        attention: None (config), a backend name, an AttentionConfig or a dict of its fields.
        cache: None = the pipeline's enabled caches (`pipe.caches`); [] = none; names or config objects for this call.
        callback(step_index, num_steps, latents): after every step; return False to cancel (raises `Cancelled`).
        sampler / shift: override the scheduler's ("unipc" | "euler", flow shift) for this call.
        """
        t_start = time.perf_counter()
        if self.transformer.causal_config is not None:
            from vdiff.streaming import collect

            return collect(self, prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                           guidance_scale, seed, cache, callback, progress, attention=attention, sampler=sampler,
                           shift=shift)
        resolve = functools.partial(self._resolve, prompt, negative_prompt, num_frames, height, width,
                                    num_inference_steps, guidance_scale, seed, attention, cache, callback, sampler,
                                    shift)
        if self.parallel is not None:
            a = self.parallel.agree(lambda: self.parallel.check_decode(resolve(), self.vae),
                                    seed_given=seed is not None)
        else:
            a = resolve()
        stats = PipelineStats() if self.parallel is None else self.parallel.stats(a.guidance)
        latent_fhw = self.vae.latent_shape(a.num_frames, a.height, a.width)  # (F', H', W')
        stats.grid = self.transformer.token_grid(latent_fhw)
        stats.tokens = int(np.prod(stats.grid))
        use_cfg = a.guidance > 1.0
        n = len(a.prompts)
        with cache_context(a.caches, a.cache_configs) as call:
            if self.parallel is not None and self.parallel.config.size > 1:
                call.relative_change = self.parallel.relative_change  # caches decide alike on every rank
            t0 = time.perf_counter()
            batch = a.prompts + a.negatives if use_cfg else a.prompts  # one batch (encoded once under parallel)
            text = (self.text_encoder.encode(batch) if self.parallel is None
                    else self.parallel.encode_text(self.text_encoder, batch))
            cond = text.embeds[:n]  # (B, S, text_dim)
            uncond = text.embeds[n:] if use_cfg else None
            stats.text_s = time.perf_counter() - t0

            g = torch.Generator(device="cpu").manual_seed(a.seed)  # CPU noise: the same video on every device
            noise = torch.randn(n, self.vae.latent_channels, *latent_fhw, generator=g)  # (B, C, F', H', W')
            noise = noise.to(self.device)
            attention_kwargs = {"attention": a.attention, "stats": stats.attention, "mask_cache": no_mask_cache(call)}
            bar = _progress_bar(a.steps) if progress else None
            t0 = time.perf_counter()
            try:
                result = denoise(self.transformer, noise, cond, uncond, a.scheduler, a.steps, a.guidance,
                                 attention_kwargs=attention_kwargs,
                                 callback=callback if self.parallel is None else self.parallel.step_callback(callback),
                                 progress=bar.update if bar is not None else None,
                                 cfg_parallel=self.parallel.cfg if self.parallel is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            stats.denoise_s = time.perf_counter() - t0
            stats.step_s = result.step_s
            # enabled caches, plus the mask builds of an uncached call (what the mask cache would save)
            stats.cache = {name: dict(call.stats.get(name, {})) for name in sorted(a.caches | set(call.stats))}

        t0 = time.perf_counter()
        with torch.no_grad():
            video = (self.vae.decode(result.latents) if self.parallel is None
                     else self.parallel.decode(self.vae, result.latents))  # (B, 3, T, H, W)
        videos = to_uint8(video)  # (B, T, H, W, 3)
        stats.decode_s = time.perf_counter() - t0
        stats.total_s = time.perf_counter() - t_start
        return VideoOutput(videos, a.prompts, a.seed, self.config.fps, stats)


@dataclass(frozen=True)
class _CallArgs:
    """One call's arguments after `VideoPipeline._resolve`: defaults filled, every value checked."""

    prompts: list[str]
    negatives: list[str]  # one per prompt
    num_frames: int
    height: int
    width: int
    steps: int
    guidance: float
    seed: int  # drawn at random when the call passed None
    attention: AttentionConfig
    scheduler: Any  # a fresh scheduler for this call (never shared between calls)
    caches: frozenset[str]
    cache_configs: dict[str, CacheConfig]  # config objects passed for this call only


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step")
