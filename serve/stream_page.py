"""The page's "Stream" tab for causal (long-video) checkpoints: chunks play as they are made.

One event (`/stream`) submits a causal request to the pool (same queue and checks as every request) and follows
its job: each new chunk updates the progress line, and whole chunks lasting at least a second become an H.264
`.ts` segment of Gradio's streaming video (upscaled by the server's `display_scale`, nearest neighbour); at the end
the original clip (model resolution) is offered for download. Stop cancels the event, which cancels the job at its
next denoising step. The prompt box queues a prompt change for the job's next chunk boundary
(`Job.change_prompt`), so the stream shows it within one chunk. "Until stopped" asks for the server's
`--max-chunks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import gradio as gr

from serve.segments import Segmenter, upscale, write_ts
from serve.validation import RANDOM_SEED, Limits, RequestError, check_prompt, validate_request
from serve.worker import Job, ServerBusy, WorkerPool

SEGMENT_SECONDS = 1.0


def ffmpeg_missing() -> str | None:
    """Why Gradio's streaming video output cannot run here (it calls ffmpeg and ffprobe), or None."""
    missing = [name for name in ("ffmpeg", "ffprobe") if shutil.which(name) is None]
    if not missing:
        return None
    return (f"streaming needs FFmpeg's {' and '.join(missing)} on PATH (Gradio's streaming video runs them): "
            "install FFmpeg (e.g. apt-get install ffmpeg); the Clip tab and the /v1 job API work without it")


def progress_line(job: Job, shown: int, segments: int) -> str:
    """One line: chunks made / asked, seconds per chunk, the prompt of the last chunk, segments sent."""
    r = job.request
    if job.started_at is None:
        return f"waiting in the queue · {r.num_chunks} chunks asked"
    parts = [f"chunk {shown} of {r.num_chunks}"]
    stats = job.chunk_stats[:shown]
    if stats:
        parts.append(f"{sum(s['seconds'] for s in stats) / len(stats):.3f} s/chunk")
        parts.append(f"prompt: {stats[-1]['prompt']}")
    parts.append(f"{segments} segment(s) streamed")
    if job.done and job.error is None:
        parts.append("done")
    return " · ".join(parts)


def add_stream_tab(pool: WorkerPool, limits: Limits, defaults: dict[str, Any],
                   track: Callable[[Any, Job | None], Job | None], fps: int) -> None:
    """Build the tab inside the current Blocks. `track(session, job)` records the session's running stream job
    (None: forget it) and returns the one recorded; `track(session, ...)` with Ellipsis only reads it."""
    g = limits.generation
    scale = limits.display_scale
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, placeholder="a red circle moving right",
                                info=f"1 to {limits.max_prompt_chars} characters", elem_id="vdiff-stream-prompt")
            with gr.Row():
                seed = gr.Dropdown(label="Seed", choices=[RANDOM_SEED], value=RANDOM_SEED, allow_custom_value=True,
                                   info="\"random\" or an integer", elem_id="vdiff-stream-seed")
                steps = gr.Number(label="Steps", value=defaults["num_inference_steps"], precision=None,
                                  info=f"{limits.steps.min} to {limits.steps.max}", elem_id="vdiff-stream-steps")
                guidance = gr.Number(label="Guidance", value=defaults["guidance_scale"], precision=None,
                                     info=f"{g.guidance[0]:g} to {g.guidance[1]:g}", elem_id="vdiff-stream-guidance")
            with gr.Row():
                chunks = gr.Number(label="Chunks", value=min(16, limits.max_chunks), precision=None,
                                   info=f"1 to {limits.max_chunks} ({limits.chunk_frames} frames each)",
                                   elem_id="vdiff-stream-chunks")
                forever = gr.Checkbox(label="Until stopped", value=False,
                                      info=f"up to {limits.max_chunks} chunks", elem_id="vdiff-stream-forever")
            with gr.Row():
                start = gr.Button("Stream", variant="primary", elem_id="vdiff-stream-start")
                stop = gr.Button("Stop", variant="stop", elem_id="vdiff-stream-stop")
            next_prompt = gr.Textbox(label="Change the prompt", lines=1, placeholder="a red circle moving up",
                                     info="takes effect at the next chunk", elem_id="vdiff-stream-next")
            change = gr.Button("Change prompt", elem_id="vdiff-stream-change")
            notice = gr.Textbox(label="Prompt changes", interactive=False, lines=1, elem_id="vdiff-stream-notice")
        with gr.Column(scale=1):
            video = gr.Video(label=f"Stream (x{scale}, nearest neighbour)" if scale > 1 else "Stream",
                             streaming=True, autoplay=True, interactive=False, elem_id="vdiff-stream-video")
            line = gr.Textbox(label="Progress", interactive=False, lines=1, elem_id="vdiff-stream-progress")
            original = gr.File(label="Original (model resolution)", interactive=False,
                               elem_id="vdiff-stream-original")

    async def run(prompt: Any, seed: Any, steps: Any, guidance: Any, chunks: Any, forever: Any,
                  request: gr.Request) -> AsyncIterator[tuple[Any, Any, Any]]:
        """Stream a causal video: yields (segment, progress line, original file) as chunks arrive."""
        if (missing := ffmpeg_missing()) is not None:
            raise gr.Error(missing, title="Streaming unavailable", print_exception=False)
        try:
            req = validate_request(limits, prompt=prompt, seed=seed, num_inference_steps=steps,
                                   guidance_scale=guidance, num_chunks=limits.max_chunks if forever else chunks)
            job = pool.submit(req)
        except RequestError as exc:
            raise gr.Error(f"Invalid input: {exc}", title="Invalid input", print_exception=False) from None
        except ServerBusy as exc:
            raise gr.Error(f"Busy, retry: {exc}", title="Busy, retry", print_exception=False) from None
        session = getattr(request, "session_hash", None)
        track(session, job)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        job.add_listener(lambda: loop.call_soon_threadsafe(wake.set))
        folder = pool.store.new_path("")
        folder.mkdir()
        pool.store.add(folder)  # the segments go with the bounded output area
        segmenter, shown, segments = Segmenter(fps, SEGMENT_SECONDS), 0, 0

        def segment(frames: Any) -> str:
            nonlocal segments
            segments += 1
            return str(write_ts(folder / f"segment-{segments:05d}.ts", upscale(frames, scale), fps))

        try:
            yield gr.skip(), progress_line(job, shown, segments), gr.skip()
            while True:
                finished = job.done  # read before the chunks: every chunk made before the end is shown
                while shown < len(job.chunk_frames):
                    shown += 1
                    pieces = segmenter.add(job.chunk_frames[shown - 1])
                    for piece in pieces:
                        yield segment(piece), progress_line(job, shown, segments), gr.skip()
                    if not pieces:
                        yield gr.skip(), progress_line(job, shown, segments), gr.skip()
                if finished:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=0.5)
                wake.clear()
            rest = segmenter.flush()
            if job.error is not None:
                if rest is not None:
                    yield segment(rest), progress_line(job, shown, segments), gr.skip()
                raise gr.Error(f"The stream stopped: {job.error}", title="Stream stopped", print_exception=False)
            assert job.result is not None
            yield (segment(rest) if rest is not None else gr.skip(), progress_line(job, shown, segments),
                   str(job.result.path))
        finally:  # Stop, a closed tab, or the end: the job stops at its next step (no-op once done)
            job.cancel()
            track(session, None)

    def change_prompt(text: Any, request: gr.Request) -> str:
        job = track(getattr(request, "session_hash", None), ...)
        if job is None or job.done:
            raise gr.Error("No stream is running: start one first", title="No stream", print_exception=False)
        try:
            text = check_prompt(limits, text)
            at = job.change_prompt(text)
        except RequestError as exc:
            raise gr.Error(f"Invalid input: {exc}", title="Invalid input", print_exception=False) from None
        return f"chunk {at}: {text}"

    from serve.app import unchecked  # every value reaches validate_request as sent (serve.app.unchecked)

    inputs = [unchecked(c) for c in (prompt, seed, steps, guidance, chunks, forever)]
    event = start.click(run, inputs=inputs, outputs=[video, line, original],
                        api_name="stream", concurrency_limit=None, show_progress="minimal")
    stop.click(None, cancels=[event], api_visibility="private")
    change.click(change_prompt, inputs=[next_prompt], outputs=[notice], api_name="change_prompt",
                 concurrency_limit=None)
