"""The job API beside the page: OpenAI-videos style JSON under `/v1`, on the FastAPI app Gradio runs.

    POST   /v1/videos                 {"prompt": ..., <VideoPipeline.__call__ parameters>} -> 201 a job
    GET    /v1/videos                 recent jobs, newest first (?limit=20)
    GET    /v1/videos/{id}            status (queued | in_progress | completed | failed | cancelled), progress, seed
    GET    /v1/videos/{id}/content    the mp4 (404 until it exists)
    GET    /v1/videos/{id}/events     server-sent events: status (now), progress, chunk (causal models: chunk n is
                                      ready, with its URL), completed | failed | cancelled
    GET    /v1/videos/{id}/chunks/{n} chunk n of a causal model's job as an mp4, as soon as it exists
    POST   /v1/videos/{id}/prompt     {"prompt": ...}: a causal job switches to it at its next chunk boundary
    DELETE /v1/videos/{id}            cancel (stops at the next denoising step) and delete its outputs
    GET    /v1/models                 the served checkpoint and its limits

Same queue (the page's `WorkerPool`) and same checks (`serve.validation.validate_request`) as the page. Errors are
`{"error": {"type", "param", "message"}}`: 400 bad input (naming the parameter), 401 no login, 404 unknown id or no
output yet, 413 too large a body, 429 queue full (with Retry-After). With `auth` every route needs HTTP basic
`user:password` or a bearer token (the password, or `user:password`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from serve.jobs import JobStore, VideoJob
from serve.validation import DEFAULT, Limits, RequestError, check_prompt, validate_request
from serve.worker import ServerBusy

MAX_BODY_BYTES = 64 * 1024  # a request is a few hundred bytes of JSON; prompts are bounded by max_prompt_chars
RETRY_AFTER_S = 5
KEEPALIVE_S = 15.0
PARAMS = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "num_frames", "height",
          "width", "attention", "cache")
CAUSAL_PARAMS = ("num_chunks", "prompts")


def error(status: int, kind: str, message: str, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "param": param, "message": message}}, status, headers=headers)


def _authorized(request: Request, auth: tuple[str, str]) -> bool:
    user, password = auth
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return (secrets.compare_digest(value.encode(), password.encode())
                or secrets.compare_digest(value.encode(), f"{user}:{password}".encode()))
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(value, validate=True)
        except ValueError:
            return False
        return secrets.compare_digest(given, f"{user}:{password}".encode())
    return False


async def _read_body(request: Request) -> bytes | None:
    """The body, or None once it passes MAX_BODY_BYTES (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            return None
    return bytes(body)


def _sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def model_card(store: JobStore, limits: Limits) -> dict[str, Any]:
    g = limits.generation
    causal = {"frames_per_chunk": limits.chunk_frames, "max_chunks": limits.max_chunks,
              "attended_chunks": limits.attended_chunks} if limits.causal else None
    return {
        "id": store.model, "object": "model", "owned_by": "vdiff", "causal": limits.causal, "chunks": causal,
        "limits": {
            "num_frames": asdict(g.frames), "frame_rule": g.frame_rule, "height": asdict(limits.sides),
            "width": asdict(limits.sides), "num_inference_steps": asdict(limits.steps),
            "guidance_scale": list(g.guidance), "max_tokens": limits.max_tokens,
            "max_prompt_chars": limits.max_prompt_chars, "attention": list(limits.attention_choices),
            "cache": list(limits.cache_choices), "max_queue": store.pool.max_queue,
        },
        "defaults": {"num_frames": g.default_frames, "height": g.default_height, "width": g.default_width,
                     "num_inference_steps": g.default_steps, "guidance_scale": g.default_guidance,
                     "attention": limits.default_attention, "cache": list(limits.default_cache)},
    }


def add_api(app: FastAPI, store: JobStore, limits: Limits, *, auth: tuple[str, str] | None = None) -> None:
    """Add the `/v1` routes to `app` (Gradio's FastAPI app, after launch: its own routes never start with /v1)."""
    router = APIRouter(prefix="/v1")
    causal = limits.causal
    params = PARAMS + CAUSAL_PARAMS if causal else PARAMS

    def denied(request: Request) -> Response | None:
        if auth is None or _authorized(request, auth):
            return None
        return error(401, "authentication_error", "login required: HTTP basic user:password or a bearer token "
                     "(the server's VDIFF_AUTH)", headers={"WWW-Authenticate": 'Basic realm="vdiff"'})

    def lookup(request: Request, video_id: str) -> VideoJob | Response:
        """The caller's job, or the error answer (401 without a login, 404 for an unknown id)."""
        if (no := denied(request)) is not None:
            return no
        vj = store.get(video_id)
        if vj is None:
            return error(404, "not_found", f"no video job {video_id!r} (unknown, or forgotten by this server)",
                         "video_id")
        return vj

    @router.post("/videos")
    async def create(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        body = await _read_body(request)
        if body is None:
            return error(413, "invalid_request_error", f"request body too large: at most {MAX_BODY_BYTES} bytes")
        try:
            body_params = json.loads(body or b"null")
        except ValueError as exc:
            return error(400, "invalid_request_error", f"the body must be a JSON object: {exc}")
        if not isinstance(body_params, dict):
            return error(400, "invalid_request_error",
                         f"the body must be a JSON object of parameters; allowed: {list(params)}")
        body_params.pop("model", None)  # one model per server: the name is informational
        for name in body_params:
            if name in CAUSAL_PARAMS and not causal:
                return error(400, "invalid_request_error", f"{name}: the served model is not causal (it generates "
                             "whole clips); leave it out", name)
            if name not in params:
                return error(400, "invalid_request_error",
                             f"{name}: unknown parameter; allowed: {list(params)}", str(name))
        try:
            kwargs = {k: body_params.get(k, DEFAULT) for k in params[1:]}
            kwargs = {k: v for k, v in kwargs.items() if v is not DEFAULT}
            req = validate_request(limits, prompt=body_params.get("prompt"), **kwargs)
            vj = store.submit(req)
        except RequestError as exc:
            return error(400, "invalid_request_error", str(exc), exc.param)
        except ServerBusy as exc:
            return error(429, "server_busy", str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse(vj.as_dict(), 201)

    @router.get("/videos")
    async def list_jobs(request: Request, limit: int = 20) -> Response:
        if (no := denied(request)) is not None:
            return no
        return JSONResponse({"object": "list", "data": [j.as_dict() for j in store.recent(max(1, min(limit, 100)))]})

    @router.get("/videos/{video_id}")
    async def retrieve(request: Request, video_id: str) -> Response:
        vj = lookup(request, video_id)
        return vj if isinstance(vj, Response) else JSONResponse(vj.as_dict())

    @router.get("/videos/{video_id}/content")
    async def content(request: Request, video_id: str) -> Response:
        vj = lookup(request, video_id)
        if isinstance(vj, Response):
            return vj
        path = vj.output
        if path is None:
            why = ("it was deleted" if vj.deleted else f"the job is {vj.status}" if vj.status != "completed"
                   else "it expired from the server's bounded output area")
            return error(404, "not_found", f"no content for {video_id}: {why}", "video_id")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @router.get("/videos/{video_id}/chunks/{index}")
    async def chunk(request: Request, video_id: str, index: int) -> Response:
        vj = lookup(request, video_id)
        if isinstance(vj, Response):
            return vj
        if not causal:
            return error(404, "not_found", f"{store.model} is not a causal model: its jobs have no chunks, only "
                         f"/v1/videos/{video_id}/content", "index")
        path = vj.chunk(index)
        if path is None:
            why = ("it was deleted" if vj.deleted else f"the job has {len(vj.job.chunks)} chunk(s) so far"
                   if 0 <= index < vj.job.request.num_chunks else f"the job has chunks 0 to "
                   f"{vj.job.request.num_chunks - 1}")
            return error(404, "not_found", f"no chunk {index} for {video_id}: {why}", "index")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}-chunk-{index:05d}.mp4")

    @router.post("/videos/{video_id}/prompt")
    async def change_prompt(request: Request, video_id: str) -> Response:
        vj = lookup(request, video_id)
        if isinstance(vj, Response):
            return vj
        body = await _read_body(request)
        try:
            data = json.loads(body or b"null") if body is not None else None
            if not isinstance(data, dict) or set(data) != {"prompt"}:
                raise RequestError('the body must be {"prompt": "..."}', "prompt")
            text = check_prompt(limits, data["prompt"])
            at = vj.job.change_prompt(text)
        except (ValueError, RequestError) as exc:
            param = getattr(exc, "param", None) or "prompt"
            return error(400, "invalid_request_error", str(exc), param)
        return JSONResponse({"id": vj.id, "prompt": text, "chunk": at})

    @router.delete("/videos/{video_id}")
    async def delete(request: Request, video_id: str) -> Response:
        vj = lookup(request, video_id)
        if isinstance(vj, Response):
            return vj
        store.delete(vj)
        return JSONResponse(vj.as_dict())

    @router.get("/videos/{video_id}/events")
    async def events(request: Request, video_id: str) -> Response:
        vj = lookup(request, video_id)
        if isinstance(vj, Response):
            return vj

        async def stream() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            wake = asyncio.Event()
            unsubscribe = vj.subscribe(lambda: loop.call_soon_threadsafe(wake.set))
            try:  # a follower that goes away ends only this generator; the job runs on
                yield _sse("status", vj.as_dict())
                sent = 0
                while True:
                    wake.clear()
                    new, finished = vj.events_since(sent)
                    for name, data in new:
                        yield _sse(name, data)
                    sent += len(new)
                    if finished and not vj.events_since(sent)[0]:
                        return
                    try:
                        await asyncio.wait_for(wake.wait(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                unsubscribe()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/models")
    async def models(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        return JSONResponse({"object": "list", "data": [model_card(store, limits)]})

    app.include_router(router)
    # first in the table, so no route of Gradio's (pages at /{name}) can ever answer a /v1 path
    app.router.routes.sort(key=lambda r: not getattr(r, "path", "").startswith("/v1/"))
