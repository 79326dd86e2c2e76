"""The web app: a Gradio Blocks page and the `/generate` API endpoint, over a `WorkerPool` (`serve()` adds the
`/v1/videos` job API of serve.api on the same app and pool).

    pool = WorkerPool.from_pretrained("checkpoints/shapes-tiny")
    app = build_app(pool, limits_for(pool.pipelines[0]))
    app.queue(**QUEUE_KWARGS).launch(server_name="127.0.0.1", server_port=7860)

The page and the API are one event, so they accept exactly the same parameters (named as in
`VideoPipeline.__call__`) and go through the same checks: `serve.validation.validate_request`. Input components do
not clamp or convert values themselves (no min/max on numbers, custom values allowed in dropdowns): every range
check lives in one place and every error names its parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from serve.api import add_api
from serve.jobs import JobStore
from serve.stream_page import add_stream_tab
from serve.validation import (
    DEFAULT_MAX_CHUNKS,
    DEFAULT_MAX_STEPS,
    RANDOM_SEED,
    Limits,
    RequestError,
    limits_for,
    validate_request,
)
from serve.worker import GenerationFailed, Job, OutOfMemory, OutputStore, ServerBusy, StepHook, WorkerPool
from vdiff.diffusion.sampling import Cancelled

log = logging.getLogger("vdiff.serve")

# Requests reach the handler at once (it only awaits the pool); the pool's bounded queue decides who waits and who
# is told "busy". Gradio's own queue therefore gets no limit of its own.
QUEUE_KWARGS: dict[str, Any] = {"max_size": None, "default_concurrency_limit": None}

DEFAULT_EXAMPLES = (
    "a red circle moving right",
    "a blue square moving up",
    "a green triangle moving left on a white background",
    "a yellow circle moving down",
)

CACHE_LABELS = {
    "text_kv": "text K/V (exact)",
    "mask": "sparse masks (exact)",
    "step": "step cache (approximate)",
    "prompt": "prompt embeddings (exact)",
}

CSS = """
#vdiff-stats textarea { font-family: ui-monospace, monospace; font-size: 0.85em; }
#vdiff-video video { image-rendering: pixelated; min-height: 256px; }
"""


C = TypeVar("C", bound=gr.components.Component)


def unchecked(component: C) -> C:
    """Let the value a client sends reach the handler as sent (no clamping or conversion by the component), so that
    `validate_request` checks every type and range in one place and names the parameter in its error.

    Done on the instance: a gradio component subclass would make gradio write a .pyi file next to this module."""
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return component


def format_stats(stats: dict[str, Any]) -> str:
    """One line: time, attention density, cache hits, seed."""
    parts = []
    total, steps = stats.get("run_s"), stats.get("steps") or stats.get("num_inference_steps")
    if total is not None:
        parts.append(f"{total:.2f} s" + (f" ({stats['step_mean_s']:.3f} s/step)" if stats.get("step_mean_s") else ""))
    if stats.get("queue_s"):
        parts.append(f"queued {stats['queue_s']:.2f} s")
    density = stats.get("attention_density")
    parts.append(f"attention {stats.get('attention', '?')}"
                 + (f" density {density:.2f}" if isinstance(density, (int, float)) else ""))
    caches = stats.get("cache")
    if isinstance(caches, dict) and caches:
        hits = []
        for name, c in caches.items():
            if "hits" in c or "misses" in c:
                hits.append(f"{name} {c.get('hits', 0)}/{c.get('hits', 0) + c.get('misses', 0)}")
            elif c:
                hits.append(f"{name} " + " ".join(f"{k}={v}" for k, v in c.items()))
            else:
                hits.append(f"{name} -")
        parts.append("cache hits " + ", ".join(hits))
    else:
        parts.append("no cache")
    if steps:
        parts.append(f"{steps} steps")
    parts.append(f"seed {stats.get('seed')}")
    if stats.get("device"):
        parts.append(str(stats["device"]))
    return " · ".join(parts)


def build_app(pool: WorkerPool, limits: Limits, *, title: str = "vdiff: text to video", banner: str | None = None,
              examples: Sequence[str] = DEFAULT_EXAMPLES, defaults: dict[str, Any] | None = None) -> gr.Blocks:
    """The page and its `/generate` endpoint. `defaults` sets initial values (num_frames, height, steps, ...)."""
    g = limits.generation
    d = {"num_inference_steps": g.default_steps, "guidance_scale": g.default_guidance, "num_frames": g.default_frames,
         "height": g.default_height, "width": g.default_width, "cache": list(limits.default_cache)}
    d.update(defaults or {})

    sessions: dict[str | None, set[Job]] = {}  # session -> its jobs (cancelled when the client goes away)
    sessions_lock = threading.Lock()

    def _forget(session: str | None, job: Job) -> None:  # with sessions_lock held
        jobs = sessions.get(session, set())
        jobs.discard(job)
        if not jobs:
            sessions.pop(session, None)

    with gr.Blocks(title=title, delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"# {title}")
        if banner:
            gr.Markdown(banner, elem_id="vdiff-banner")
        streams: dict[str | None, Job] = {}  # session -> its running stream (the Stream tab's prompt changes)

        def track(session: str | None, job: Any) -> Job | None:
            with sessions_lock:
                if job is None:
                    old = streams.pop(session, None)
                    if old is not None:
                        _forget(session, old)
                    return None
                if job is not ...:
                    streams[session] = job
                    sessions.setdefault(session, set()).add(job)
                return streams.get(session)

        if limits.causal:
            with gr.Tab("Stream", id="stream"):
                add_stream_tab(pool, limits, d, track, pool.pipelines[0].config.fps)
        with gr.Tab("Clip", id="clip") if limits.causal else contextlib.nullcontext(), gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, placeholder="a red circle moving right",
                                    info=f"1 to {limits.max_prompt_chars} characters", elem_id="vdiff-prompt")
                negative_prompt = gr.Textbox(label="Negative prompt", value="", lines=1, placeholder="optional",
                                             elem_id="vdiff-negative")
                with gr.Row():
                    seed = gr.Dropdown(label="Seed", choices=[RANDOM_SEED], value=RANDOM_SEED, allow_custom_value=True,
                                       info="\"random\" or an integer", elem_id="vdiff-seed")
                    num_inference_steps = gr.Number(label="Steps", value=d["num_inference_steps"], precision=None,
                                                    info=f"{limits.steps.min} to {limits.steps.max}",
                                                    elem_id="vdiff-steps")
                    guidance_scale = gr.Number(label="Guidance", value=d["guidance_scale"], precision=None,
                                               info=f"{g.guidance[0]:g} to {g.guidance[1]:g}",
                                               elem_id="vdiff-guidance")
                with gr.Row():  # resolution: only sizes the model supports
                    num_frames = gr.Dropdown(label="Frames", choices=list(limits.frame_choices),
                                             value=d["num_frames"], elem_id="vdiff-frames")
                    height = gr.Dropdown(label="Height", choices=list(limits.size_choices), value=d["height"],
                                         elem_id="vdiff-height")
                    width = gr.Dropdown(label="Width", choices=list(limits.size_choices), value=d["width"],
                                        elem_id="vdiff-width")
                attention = gr.Dropdown(label="Attention", choices=list(limits.attention_choices),
                                        value=limits.default_attention, info="backends that can run on this server",
                                        elem_id="vdiff-attention")
                cache = gr.CheckboxGroup(label="Caches", choices=[(CACHE_LABELS.get(c, c), c)
                                                                  for c in limits.cache_choices],
                                         value=d["cache"], elem_id="vdiff-cache")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="vdiff-generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="vdiff-cancel")
            with gr.Column(scale=1):
                video = gr.Video(label="Video", format=None, autoplay=True, loop=True, interactive=False,
                                 buttons=["download"], elem_id="vdiff-video")
                stats_line = gr.Textbox(label="Stats", interactive=False, lines=1, elem_id="vdiff-stats")
                original = gr.File(label="Original (model resolution)", interactive=False,
                                   elem_id="vdiff-original", visible=limits.display_scale > 1)
                with gr.Accordion("All stats", open=False):
                    stats_json = gr.JSON(label="stats")
        inputs = [unchecked(c) for c in (prompt, negative_prompt, seed, num_inference_steps, guidance_scale,
                                         num_frames, height, width, attention, cache)]
        gr.Examples(examples=[[p] for p in examples], inputs=[prompt], label="Examples")
        gr.Markdown(f"Devices: {', '.join(pool.devices)} · one generation per device at a time · "
                    f"up to {pool.max_queue} requests wait in the queue. "
                    "API: `Client(url).predict(prompt=..., num_frames=..., api_name=\"/generate\")`.")

        # Output files are written straight into the pool's bounded area and served from there (no second copy).
        video.GRADIO_CACHE = str(pool.store.root)

        async def generate(prompt: str, negative_prompt: str | None, seed: Any, num_inference_steps: Any,
                           guidance_scale: Any, num_frames: Any, height: Any, width: Any, attention: Any,
                           cache: Any, request: gr.Request, progress: gr.Progress = gr.Progress()):  # noqa: B008
            """Generate a video; returns (mp4 as shown, stats line, stats dict, the original's path)."""
            try:
                req = validate_request(limits, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                       num_frames=num_frames, height=height, width=width, attention=attention,
                                       cache=cache)
                job = pool.submit(req)
            except RequestError as exc:
                raise gr.Error(f"Invalid input: {exc}", title="Invalid input", print_exception=False) from None
            except ServerBusy as exc:
                raise gr.Error(f"Busy, retry: {exc}", title="Busy, retry", print_exception=False) from None

            loop = asyncio.get_running_loop()
            wake = asyncio.Event()
            job.add_listener(lambda: loop.call_soon_threadsafe(wake.set))
            session = getattr(request, "session_hash", None)
            with sessions_lock:
                sessions.setdefault(session, set()).add(job)
            try:
                while not job.done:
                    if job.started_at is None:
                        position = pool.queue_position(job)
                        progress(0.0, desc=f"waiting in queue (position {0 if position is None else position + 1})")
                    else:
                        progress((job.step, job.num_steps), desc="denoising", unit="steps")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=0.5)
                    wake.clear()
            finally:  # also the Cancel button / gradio_client's job.cancel(): gradio cancels this task
                job.cancel()  # no-op once done
                with sessions_lock:
                    _forget(session, job)
            if isinstance(job.error, OutOfMemory):
                raise gr.Error(str(job.error), title="Out of memory", print_exception=False)
            if isinstance(job.error, Cancelled):
                raise gr.Error(f"Cancelled: {job.error}", title="Cancelled", print_exception=False)
            if isinstance(job.error, RequestError):
                raise gr.Error(f"Invalid input: {job.error}", title="Invalid input", print_exception=False)
            if isinstance(job.error, GenerationFailed):
                raise gr.Error(str(job.error), title="Generation failed", print_exception=False)
            if job.error is not None:
                raise gr.Error(f"generation failed on the server ({type(job.error).__name__})",
                               title="Generation failed")
            assert job.result is not None
            result = job.result
            shown = result.preview or result.path  # small clips: the nearest-neighbour upscale (display_scale)
            return str(shown), format_stats(result.stats), result.stats, str(result.path)

        # A client that goes away (tab closed, process killed, network gone) drops its heartbeat connection; gradio
        # then fires `unload` for its session, but does not stop a running event: stop its jobs here.

        def client_gone(request: gr.Request) -> None:
            with sessions_lock:
                jobs = sessions.pop(request.session_hash, set())
            for job in jobs:
                log.info("client of job %s disconnected; cancelling it", job.id)
                job.cancel()

        demo.unload(client_gone)

        original_path = gr.State(None)  # not an API output: /generate returns (video, stats line, stats)
        event = run.click(generate, inputs=inputs, outputs=[video, stats_line, stats_json, original_path],
                          api_name="generate", concurrency_limit=None, show_progress="full")
        event.then(lambda path: path, inputs=[original_path], outputs=[original], api_visibility="private")
        stop.click(None, cancels=[event], api_visibility="private")
    return demo


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`user:password` (e.g. from the VDIFF_AUTH environment variable) -> (user, password); empty -> no login."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("VDIFF_AUTH must look like user:password")
    return user, password


def launch_kwargs(pool: WorkerPool) -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch`: serve files from the pool's output area only, show error messages."""
    return {"allowed_paths": [str(pool.store.root)], "show_error": True, "ssr_mode": False, "footer_links": ["api"]}


class RunningServer:
    """A launched app, its pool and the job API's jobs; `close()` stops both and deletes the output area."""

    def __init__(self, app: gr.Blocks, pool: WorkerPool, url: str, jobs: JobStore | None = None):
        self.app, self.pool, self.url, self.jobs = app, pool, url, jobs

    def close(self) -> None:
        self.app.close()
        self.pool.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 7860, devices: Sequence[str] | None = None,
          max_queue: int = 8, max_outputs: int = 64, max_tokens: int | None = None, max_steps: int = DEFAULT_MAX_STEPS,
          auth: tuple[str, str] | None = None, banner: str | None = None, block: bool = True, quiet: bool = False,
          step_hooks: Sequence[StepHook] = (), lora: str | Path | None = None, lora_scale: float = 1.0,
          max_chunks: int = DEFAULT_MAX_CHUNKS, display_scale: int | None = None,
          groups: Sequence[Sequence[str]] | None = None, parallel: dict[str, Any] | None = None) -> RunningServer:
    """Load the checkpoint once per device, build the page and serve it on host:port.

    With block=False it returns at once (tests, benchmarks); otherwise it serves until interrupted. `lora`: an
    adapter every pipeline loads at start (the operator's choice; requests cannot name one). `max_chunks`: a causal
    model's longest video per request; `display_scale`: the page's nearest-neighbour upscale (None: automatic).
    `groups` (instead of `devices`) + `parallel`: worker groups of several devices, one request each (serve.groups).
    """
    pool = WorkerPool.from_pretrained(checkpoint, devices, lora=lora, lora_scale=lora_scale, max_queue=max_queue,
                                      store=OutputStore(max_files=max_outputs), step_hooks=step_hooks,
                                      groups=groups, parallel=parallel)
    try:
        first = pool.devices[0].split("+")[0]  # a group "cuda:0+cuda:1": its rank 0's device
        limits = limits_for(pool.pipelines[0], first, max_tokens=max_tokens, max_steps=max_steps,
                            max_chunks=max_chunks, display_scale=display_scale)
        pool.display_scale = limits.display_scale
        app = build_app(pool, limits, banner=banner, title=f"vdiff: {Path(checkpoint).name}")
        app.queue(**QUEUE_KWARGS)
        _, url, _ = app.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=True,
                               quiet=quiet, **launch_kwargs(pool))
        jobs = JobStore(pool, model=Path(checkpoint).name)
        add_api(app.app, jobs, limits, auth=auth)  # /v1: same process, same pool, same checks as the page
    except BaseException:
        pool.close()
        raise
    server = RunningServer(app, pool, url, jobs)
    if not block:
        return server
    try:
        app.block_thread()
    finally:
        server.close()
    return server
