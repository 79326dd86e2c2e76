"""A small client for a vdiff server's job API (`/v1/videos`, see serve.api), on httpx.

    from vdiff.client import VideoClient
    with VideoClient("http://127.0.0.1:7860", token="user:secret") as c:
        path = c.generate("a red circle moving right", num_frames=16, seed=0, path="clip.mp4")
        for name, job in c.stream("a blue square moving up"):     # server-sent events of a new job
            print(name, job["status"], job["progress"])

`token`: "user:password" is sent as HTTP basic, anything else as a bearer token; None for an open server.
An error answer raises `APIError` with the server's `status_code`, `type`, `param`, `message` (and `retry_after`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("completed", "failed", "cancelled")


class APIError(RuntimeError):
    """An error answer: `status_code`, and the server's `type`, `param` and `message`."""

    def __init__(self, status_code: int, type: str | None, message: str, param: str | None = None,  # noqa: A002
                 retry_after: float | None = None):
        super().__init__(f"{status_code} {type}: {message}" + (f" (param {param})" if param else ""))
        self.status_code, self.type, self.message, self.param = status_code, type, message, param
        self.retry_after = retry_after


class JobFailed(RuntimeError):
    """The job ended failed or cancelled; `job` is its last state."""

    def __init__(self, job: dict[str, Any]):
        why = (job.get("error") or {}).get("message") or job["status"]
        super().__init__(f"video job {job['id']} {job['status']}: {why}")
        self.job = job


class VideoClient:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0):
        auth: Any = None
        headers = {}
        if token and ":" in token:
            user, _, password = token.partition(":")
            auth = httpx.BasicAuth(user, password)
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=url.rstrip("/"), auth=auth, headers=headers, timeout=timeout)

    # ---- plain calls -----------------------------------------------------------------------------------------

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.is_success:
            return r
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            err = {"type": None, "message": r.text[:500]}
        retry = r.headers.get("retry-after")
        raise APIError(r.status_code, err.get("type"), err.get("message", ""), err.get("param"),
                       float(retry) if retry else None)

    def create(self, prompt: str, **params: Any) -> dict[str, Any]:
        """Queue a job (parameters named as in `VideoPipeline.__call__`); returns it, status "queued"."""
        return self._check(self.http.post("/v1/videos", json={"prompt": prompt, **params})).json()

    def retrieve(self, video_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/videos/{video_id}")).json()

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/videos", params={"limit": limit})).json()["data"]

    def delete(self, video_id: str) -> dict[str, Any]:
        """Cancel the job if it has not ended, and delete its outputs."""
        return self._check(self.http.delete(f"/v1/videos/{video_id}")).json()

    def content(self, video_id: str) -> bytes:
        """The finished mp4."""
        return self._check(self.http.get(f"/v1/videos/{video_id}/content")).content

    def chunk(self, video_id: str, index: int) -> bytes:
        """Chunk `index` of a causal model's job (an mp4), once generated."""
        return self._check(self.http.get(f"/v1/videos/{video_id}/chunks/{index}")).content

    def change_prompt(self, video_id: str, prompt: str) -> int:
        """Switch a causal job to `prompt` at its next chunk boundary; returns the chunk it takes effect at."""
        return self._check(self.http.post(f"/v1/videos/{video_id}/prompt", json={"prompt": prompt})).json()["chunk"]

    def models(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/models")).json()["data"]

    # ---- following a job ---------------------------------------------------------------------------------------

    def events(self, video_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event name, job state) from the server's event stream until the job ends. Stopping early (closing the
        iterator) disconnects without touching the job."""
        with self.http.stream("GET", f"/v1/videos/{video_id}/events", timeout=httpx.Timeout(30.0, read=None)) as r:
            if not r.is_success:
                r.read()
                self._check(r)
            name, data = "message", []
            for line in r.iter_lines():
                if line.startswith(":"):
                    continue
                if not line:  # blank line: one event ends
                    if data:
                        yield name, json.loads("\n".join(data))
                    name, data = "message", []
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

    def wait(self, video_id: str) -> dict[str, Any]:
        """Follow the job's events until it ends; its last state."""
        job = self.retrieve(video_id)
        for _, job in self.events(video_id):
            if job["status"] in TERMINAL:
                break
        return job

    def stream(self, prompt: str, **params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """Create a job and yield its events until it ends."""
        yield from self.events(self.create(prompt, **params)["id"])

    def generate(self, prompt: str, *, path: str | Path | None = None, **params: Any) -> bytes | Path:
        """Create a job, follow it to its end and return the mp4 (bytes, or written to `path`). Raises `JobFailed`
        when it fails or is cancelled."""
        job = self.wait(self.create(prompt, **params)["id"])
        if job["status"] != "completed":
            raise JobFailed(job)
        data = self.content(job["id"])
        if path is None:
            return data
        path = Path(path)
        path.write_bytes(data)
        return path

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> VideoClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
