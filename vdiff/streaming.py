"""Long video: a causal VideoDiT generates chunk after chunk, each denoised while it attends to the earlier ones.

`VideoPipeline.stream(...)` yields `VideoChunk`s; `VideoPipeline.__call__` on a causal model collects them. Per chunk c:

    noise_c            drawn from a generator seeded by (seed, c): the same video for the same seed, however far
                       the caller reads
    denoise            every step runs the model on chunk c. With the `causal_kv` cache the forward holds chunk c
                       alone and attends to the stored K/V of the chunks it sees; without it (cache=[] or a list
                       without causal_kv) the forward holds the whole history [context 0 .. context c-1 | noisy c]
                       (the reference: the full block-causal forward, recomputed at every step)
    commit             the denoised chunk x0_c becomes context: x_ctx = (1 - s) x0_c + s eps_c at s = context_noise
                       (eps_c seeded by (seed, c) too); commit="clean" runs one forward of x_ctx at t = 1000 s that
                       stores chunk c's K/V; commit="last_step" stored the last denoising step's K/V instead
    decode             x0_c -> frames (the pixel VAE decodes each chunk on its own)

A prompt switch at chunk k (`prompts={k: text}`) re-encodes the text and re-commits the chunks the cache holds with
the new prompt, oldest first (LongLive's KV re-cache), so motion continues from the same frames while the new
prompt takes over. With switch guidance g > 1 (`switch_guidance`), the old prompt's cache is kept aside (a copy taken
before the re-cache) and for the next `switch_guidance_chunks` chunks every step runs the model under both prompts,
each over its own cache (chunks generated meanwhile are committed to both), and uses v_old + g (v_new - v_old): the
old prompt as the negative, so the guidance pushes only on what the prompts differ in (the motion, not the object).
Without the KV cache the old branch is the full history under the old prompt, so cached equals uncached here too.
Classifier-free guidance batches the conditional and unconditional branches (2B rows), each with
its own K/V rows; under cfg parallel (ParallelConfig(cfg=2)) each rank runs one branch and keeps only that branch's
K/V, and the ranks exchange v once per step. Under parallelism every chunk starts with one broadcast from rank 0
(go on or stop, and its prompt switch): a switch added while the stream runs is rank 0's, and when rank 0's caller
stops iterating, the other ranks (a spawned group's followers run the same stream) stop at the same chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vdiff.cache import CacheCall, CausalKVState, cache_context
from vdiff.diffusion.sampling import Cancelled
from vdiff.pipeline_io import to_uint8


@dataclass
class VideoChunk:
    """One generated chunk: `frames` uint8 (t, H, W, 3) of the first prompt, `videos` (B, t, H, W, 3) of all."""

    index: int
    videos: np.ndarray
    latents: torch.Tensor  # (B, C, f, H', W') the denoised chunk
    prompt: str
    seed: int  # the stream's seed (drawn at random when the call passed None)
    stats: dict[str, Any] = field(default_factory=dict)  # seconds, steps, tokens attended, KV bytes

    @property
    def frames(self) -> np.ndarray:
        return self.videos[0]


def _generator(seed: int, chunk: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, chunk, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def check_stream_args(num_chunks: Any, prompts: Any) -> dict[int, str]:
    """ValueError naming the argument for a bad `num_chunks` or `prompts`; returns the prompt switches."""
    if num_chunks is not None and (isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1):
        raise ValueError(f"num_chunks must be None (until the caller stops) or an int >= 1, got {num_chunks!r}")
    if prompts is None:
        return {}
    if not isinstance(prompts, dict):
        raise ValueError(f"prompts must be a dict {{chunk index: prompt}}, got {type(prompts).__name__}")
    for k, text in prompts.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"prompts: keys must be chunk indices (ints >= 0), got {k!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"prompts[{k}] must be a non-empty string, got {text!r}")
    return prompts  # the caller's dict: entries it adds while the stream runs are switches too (checked at use)


def stream_chunks(pipe: Any, a: Any, *, num_chunks: int | None, switches: dict[int, str], context_noise: float,
                  commit: str | None, attention_stats: Any, callback: Callable | None = None,
                  progress: bool = False, external: str = "off",
                  switch_guidance: tuple[float, int] = (1.0, 1)) -> Iterator[VideoChunk]:
    """The chunk loop (see the module docstring). `a`: VideoPipeline's resolved call arguments; `commit`: the
    causal_kv cache's commit mode, or None to run the reference (no KV cache); `switch_guidance`: (scale, chunks)."""
    model = pipe.transformer
    device = pipe.device
    dtype = next(model.parameters()).dtype
    f, hl, wl = pipe.vae.latent_shape(pipe.chunk_pixel_frames, a.height, a.width)  # one chunk's latent frames
    n = len(a.prompts)
    use_cfg = a.guidance > 1.0
    par = pipe.parallel if pipe.parallel is not None and pipe.parallel.config.size > 1 else None
    cfg_par = par.cfg if par is not None and use_cfg else None  # cfg=2: this rank runs one branch, B rows
    double = use_cfg and cfg_par is None  # both branches in this forward (2B rows)
    step_callback = par.step_callback(callback) if par is not None else callback  # every rank stops alike
    state = CausalKVState(external=external) if commit is not None else None
    history: list[tuple[int, torch.Tensor]] = []  # (chunk, x_ctx): the reference's whole history / the re-cache set
    t_ctx = torch.tensor(1000.0 * context_noise, device=device)
    prompts = list(a.prompts)
    g_switch, switch_chunks = switch_guidance
    old: dict[str, Any] | None = None  # while switch guidance runs: the old prompt's text, KV state, chunks left

    call = CacheCall(frozenset(a.caches), dict(a.cache_configs))  # one call's state (the text K/V) for the stream
    tokens_per_chunk = math.prod(model.token_grid((f, hl, wl)))

    def encode(texts: list[str]) -> torch.Tensor:
        batch = texts + a.negatives if use_cfg else texts
        emb = (pipe.text_encoder.encode(batch) if par is None
               else par.encode_text(pipe.text_encoder, batch)).embeds  # (B or 2B, S, text_dim)
        if cfg_par is not None:
            emb = cfg_par.branch(emb[:n], emb[n:])  # this rank's branch
        return emb.to(device, dtype)

    def forward(x: torch.Tensor, t: torch.Tensor, chunk: int, step: int | None, store: bool,
                text: torch.Tensor | None = None, kv: CausalKVState | None = None) -> torch.Tensor:
        """Guided velocity of chunk `chunk` at timestep t for latents x (B, C, f, H', W') under `text` (default:
        the prompt in force) over the cache `kv` (default: the stream's); the model runs both CFG branches (2B
        rows), or this rank's one under cfg parallel (then one exchange of v)."""
        text = context if text is None else text
        kv = state if kv is None else kv
        x_in = torch.cat([x, x]) if double else x
        kwargs = {"attention": a.attention, "stats": attention_stats, "step": step}
        if kv is not None:
            kv.store = store
            kwargs.update(chunks=[(chunk, step is None)], kv_cache=kv)
            t_in = t.expand(x_in.shape[0])
        else:  # the reference: every earlier chunk's context latents in the same forward, at t_ctx
            ctx_x = [h for _, h in history]
            if double:
                ctx_x = [torch.cat([h, h]) for h in ctx_x]
            x_in = torch.cat([*ctx_x, x_in], dim=2)  # (B', C, (len(history) + 1) * f, H', W')
            t_in = torch.cat([t_ctx.expand(len(history) * tokens_per_chunk), t.expand(tokens_per_chunk)])
            t_in = t_in.expand(x_in.shape[0], -1)  # per-token timesteps (B', L)
            kwargs.update(chunks=[(j, True) for j, _ in history] + [(chunk, step is None)])
        v = model(x_in.to(dtype), t_in, text, return_dict=False, attention_kwargs=kwargs)[0].float()
        v = v[:, :, -f:]  # the current chunk
        if cfg_par is not None:
            v = cfg_par.gather(v)  # [v_cond; v_uncond] on both ranks
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + a.guidance * (v_cond - v_uncond)
        if kv is not None:
            kv.store = False
        return v

    def velocity(x: torch.Tensor, t: torch.Tensor, chunk: int, step: int | None, store: bool) -> torch.Tensor:
        """`forward`, and while switch guidance runs, pushed away from the old prompt's velocity (each branch
        stores into its own cache when `store`)."""
        v = forward(x, t, chunk, step, store)
        if old is not None:
            v_old = forward(x, t, chunk, step, store, text=old["text"], kv=old["kv"])
            v = v_old + g_switch * (v - v_old)
        return v

    def make_context(x0: torch.Tensor, chunk: int) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=_generator(a.seed, chunk, 1)).to(device)
        return (1 - context_noise) * x0 + context_noise * eps

    with cache_context(call=call, keep=True):
        context = encode(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_chunks * a.steps if num_chunks else None, desc="chunks x steps", unit="step")
    chunk = 0
    while num_chunks is None or chunk < num_chunks:
        t0 = time.perf_counter()
        with torch.no_grad(), cache_context(call=call, keep=True):
            switch = switches.get(chunk)
            if par is not None:  # live steering follows rank 0 (the caller of a spawned group, the server)
                go, switch = par.leader_value((True, switch))
                if not go:  # rank 0's caller stopped iterating (see the GeneratorExit below): stop here too
                    break
            if switch is not None:
                check_stream_args(None, {chunk: switch})  # added while the stream ran: checked here
                if g_switch > 1.0 and chunk > 0 and any(p != switch for p in prompts):
                    # the old prompt's branch: its text and its cache as they are (not re-cached); not at chunk 0
                    # (the old prompt made nothing yet) nor for a switch to the prompt in force
                    old = {"text": context, "kv": state.copy() if state is not None else None, "left": switch_chunks}
                prompts = [switch] * n
                context = encode(prompts)  # a new tensor: the text K/V hooks recompute it once
                if state is not None:  # re-commit the held chunks under the new prompt, oldest first
                    for j, x_ctx in history:
                        forward(x_ctx, t_ctx, j, None, store=True)
            noise = torch.randn(n, pipe.vae.latent_channels, f, hl, wl, generator=_generator(a.seed, chunk, 0))
            x = noise.to(device)
            scheduler = type(a.scheduler).from_config(a.scheduler.config)
            scheduler.set_timesteps(a.steps, device=device)
            last = len(scheduler.timesteps) - 1
            for i, t in enumerate(scheduler.timesteps):
                v = velocity(x, t, chunk, i, store=commit == "last_step" and i == last)
                x = scheduler.step(v, t, x, return_dict=False)[0]
                if bar is not None:
                    bar.update()
                if step_callback is not None and step_callback(i, a.steps, x) is False:
                    raise Cancelled(f"sampling cancelled by the callback at chunk {chunk}, after step "
                                    f"{i + 1}/{a.steps}")
            x_ctx = make_context(x, chunk)
            if commit == "clean":
                forward(x_ctx, t_ctx, chunk, None, store=True)
                if old is not None and old["kv"] is not None:  # the old branch reads this chunk as context too
                    forward(x_ctx, t_ctx, chunk, None, store=True, text=old["text"], kv=old["kv"])
            guided = old is not None
            old_bytes = old["kv"].bytes if guided and old["kv"] is not None else 0
            if old is not None:
                old["left"] -= 1
                if old["left"] == 0:
                    old = None
            history.append((chunk, x_ctx))
            if state is not None:  # keep only what a re-cache needs: the chunks the buffers hold
                held = set(state.chunks())
                history = [(j, h) for j, h in history if j in held]
            t_decode = time.perf_counter()
            videos = to_uint8(pipe.vae.decode(x) if pipe.parallel is None
                              else pipe.parallel.decode(pipe.vae, x))  # (B, t, H, W, 3)
        stats = {"seconds": time.perf_counter() - t0, "decode_s": time.perf_counter() - t_decode, "steps": a.steps,
                 "tokens_attended": state.attended_tokens if state is not None else None,
                 "kv_bytes": (state.bytes if state is not None else 0) + old_bytes,
                 "context_chunks": len(history),
                 "switch_guidance": g_switch if guided else None}
        if pipe.parallel is not None:  # this rank's share: under cfg=2 the KV bytes are its branch's
            stats["parallel"] = pipe.parallel.stats(a.guidance).parallel
        try:
            yield VideoChunk(chunk, videos, x, prompts[0], a.seed, stats)
        except GeneratorExit:  # the caller closed the stream; ranks waiting for the next chunk hear it from rank 0
            if par is not None and (num_chunks is None or chunk + 1 < num_chunks):
                par.leader_value((False, None))
            raise
        chunk += 1
    if bar is not None:
        bar.close()
    call.data.clear()


def collect(pipe: Any, prompt: Any, negative_prompt: Any, num_frames: Any, height: Any, width: Any, steps: Any,
            guidance: Any, seed: Any, cache: Any, callback: Any, progress: bool = False, attention: Any = None,
            sampler: str | None = None, shift: float | None = None) -> Any:
    """`VideoPipeline.__call__` on a causal model: `num_frames` / frames-per-chunk chunks of `stream`, one clip."""
    from vdiff.outputs import PipelineStats, VideoOutput

    per = pipe.chunk_pixel_frames
    frames = pipe.limits.default_frames if num_frames is None else num_frames
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < per or frames % per:
        raise ValueError(f"num_frames={frames!r} is not allowed for this causal model: must be a multiple of "
                         f"{per} (frames per chunk) and >= {per}")
    t0 = time.perf_counter()
    gen = pipe.stream(prompt, num_chunks=frames // per, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                      cache=cache, callback=callback, negative_prompt=negative_prompt, height=height, width=width,
                      attention=attention, sampler=sampler, shift=shift, progress=progress)
    chunks = list(gen)
    stats = PipelineStats(parallel=chunks[0].stats.get("parallel") or {})
    stats.denoise_s = sum(c.stats["seconds"] - c.stats["decode_s"] for c in chunks)
    stats.decode_s = sum(c.stats["decode_s"] for c in chunks)
    stats.total_s = time.perf_counter() - t0
    stats.cache = {"causal_kv": {"chunks": len(chunks), "kv_bytes": chunks[-1].stats["kv_bytes"]}}
    steps_done = sum(c.stats["steps"] for c in chunks)
    stats.step_s = [stats.denoise_s / steps_done] * steps_done  # per step, averaged over the chunks
    latent = pipe.vae.latent_shape(frames, chunks[0].videos.shape[2], chunks[0].videos.shape[3])
    stats.grid = pipe.transformer.token_grid(latent)
    stats.tokens = int(np.prod(stats.grid))
    videos = np.concatenate([c.videos for c in chunks], axis=1)  # (B, T, H, W, 3)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return VideoOutput(videos, prompts, chunks[0].seed, pipe.config.fps, stats)
