"""The job API for a causal (long-video) model: chunks as events and downloads while the job runs, prompt switches
(in the request and mid-stream), validation of num_chunks / prompts, and delete freeing the chunks. Real server on
loopback, real HTTP clients; a tiny random-weight causal pipeline from disk, compared with a direct `pipe.stream`."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _serve_helpers import decode_video, save_tiny_pipeline, serving, wait_until

from vdiff.client import APIError, VideoClient

FAST = dict(num_inference_steps=2, height=32, width=32, guidance_scale=1.0)
PROMPT, OTHER = "a red circle moving right", "a blue square moving up"
MAX_CHUNKS = 6


class ChunkGate:
    """Step hook: a request whose prompt contains "[gate]" waits at the first step of chunk `at` until released."""

    def __init__(self, at: int = 2):
        self.at, self.release, self.waiting = at, threading.Event(), threading.Event()

    def __call__(self, job, step, num_steps):
        if "[gate]" in job.request.prompt and step == 0 and len(job.chunks) == self.at:
            self.waiting.set()
            deadline = time.monotonic() + 60
            while not self.release.is_set() and not job.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)
            self.waiting.clear()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("causal") / "tiny-causal", causal=True)


@pytest.fixture(scope="module")
def gate():
    return ChunkGate()


@pytest.fixture(scope="module")
def server(checkpoint, gate):
    with serving(checkpoint, max_queue=2, max_outputs=8, step_hooks=[gate], max_chunks=MAX_CHUNKS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return VideoClient(server.url)


@pytest.fixture(autouse=True)
def _released(gate):
    gate.release.clear()
    yield
    gate.release.set()


@pytest.fixture(scope="module")
def direct(checkpoint):
    """The same model loaded directly: what the server's chunks must show."""
    from vdiff import VideoPipeline

    pipe = VideoPipeline.from_pretrained(checkpoint)
    return lambda prompt, **kw: [c.frames for c in pipe.stream(prompt, **FAST, **kw)]


def _decoded(data: bytes) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        return decode_video(f.name)


def _close(video: np.ndarray, frames: np.ndarray) -> None:
    """A served chunk shows the generated frames: it decodes to what the same frames encoded here decode to (H.264
    with 4:2:0 chroma is lossy on random-weight noise, so the comparison is encoded against encoded), and its mean
    colour per frame is the frames'."""
    from vdiff.pipeline_io import write_video

    assert video.shape == frames.shape, (video.shape, frames.shape)
    with tempfile.TemporaryDirectory() as tmp:
        want = decode_video(write_video(Path(tmp) / "want.mp4", frames))
    assert np.abs(video.astype(int) - want.astype(int)).max() <= 2
    assert np.abs(video.mean(axis=(1, 2)) - frames.mean(axis=(1, 2))).max() < 8


def test_chunks_arrive_as_events_and_downloads_while_the_job_runs(client, gate, direct):
    job = client.create(PROMPT + " [gate]", num_chunks=4, seed=5, **FAST)
    # a snapshot: the idle worker may already run the job, but the gate holds it before chunk 2
    assert job["num_chunks"] == 4 and job["chunks_done"] <= 2 and job["status"] in ("queued", "in_progress")
    assert gate.waiting.wait(60)  # held at the first step of chunk 2: chunks 0 and 1 exist, the job runs
    now = client.retrieve(job["id"])
    assert now["status"] == "in_progress" and now["chunks_done"] == 2 and 0 < now["progress"] < 100
    want = direct(PROMPT + " [gate]", num_chunks=4, seed=5)
    for i in range(2):
        _close(_decoded(client.chunk(job["id"], i)), want[i])
    with pytest.raises(APIError) as err:
        client.chunk(job["id"], 2)
    assert err.value.status_code == 404 and "has 2 chunk(s) so far" in err.value.message
    gate.release.set()
    events = list(client.events(job["id"]))
    names = [n for n, _ in events]
    assert names[-1] == "completed"
    chunk_events = [d for n, d in events if n == "chunk"]
    assert [d["index"] for d in chunk_events] == [0, 1, 2, 3]  # the log from the start, in order
    assert chunk_events[2]["url"] == f"/v1/videos/{job['id']}/chunks/2"
    assert [d["chunks_done"] for d in chunk_events] == [1, 2, 3, 4]
    progress = [d["progress"] for n, d in events if n != "status"]  # the log after the current state
    assert progress == sorted(progress) and progress[-1] == 100
    _close(_decoded(client.content(job["id"])), np.concatenate(want))
    with pytest.raises(APIError) as err:
        client.chunk(job["id"], 4)
    assert err.value.status_code == 404 and "chunks 0 to 3" in err.value.message


def test_prompt_switch_in_the_request_and_mid_stream(client, gate, direct):
    job = client.create(PROMPT + " [gate]", num_chunks=5, seed=7, prompts={"1": OTHER}, **FAST)
    assert job["prompts"] == {"1": OTHER}
    assert gate.waiting.wait(60)  # at chunk 2's first step: the next boundary is chunk 3
    assert client.change_prompt(job["id"], PROMPT) == 3
    gate.release.set()
    events = list(client.events(job["id"]))
    done = events[-1][1]
    assert done["status"] == "completed" and done["prompts"] == {"1": OTHER, "3": PROMPT}
    made_by = [d["prompt"] for n, d in events if n == "chunk"]
    assert made_by == [PROMPT + " [gate]", OTHER, OTHER, PROMPT, PROMPT]
    want = direct(PROMPT + " [gate]", num_chunks=5, seed=7, prompts={1: OTHER, 3: PROMPT})
    for i in (3, 4):
        _close(_decoded(client.chunk(job["id"], i)), want[i])
    with pytest.raises(APIError) as err:
        client.change_prompt(job["id"], OTHER)  # ended: no chunk left
    assert err.value.status_code == 400 and err.value.param == "prompt"


@pytest.mark.parametrize("params, param, words", [
    ({"num_chunks": 0}, "num_chunks", "num_chunks must be an integer in [1, 6]"),
    ({"num_chunks": MAX_CHUNKS + 1}, "num_chunks", "in [1, 6], got 7"),
    ({"num_chunks": "many"}, "num_chunks", "integer"),
    ({"num_chunks": 2, "num_frames": 6}, "num_frames", "disagrees with num_chunks=2"),
    ({"num_frames": 5}, "num_frames", "multiple of 2"),
    ({"prompts": {"-1": "x"}}, "prompts", "keys must be chunk indices in [0, 2]"),
    ({"prompts": {"9": "x"}}, "prompts", "got '9'"),
    ({"prompts": ["x"]}, "prompts", "must be an object"),
    ({"prompts": {"1": ""}}, "prompts", "must not be empty"),
])
def test_bad_causal_input_is_a_400_naming_the_parameter(client, params, param, words):
    body = {"num_chunks": 3, **params} if "num_chunks" not in params and "num_frames" not in params else params
    with pytest.raises(APIError) as err:
        client.create(PROMPT, **{**FAST, **body})
    assert err.value.status_code == 400 and err.value.param.startswith(param) and words in err.value.message
    assert client.models()[0]["causal"] is True  # still serving


def test_num_frames_asks_for_chunks_and_the_model_card_says_the_limits(client):
    job = client.create(PROMPT, num_frames=6, seed=1, **FAST)
    assert job["num_chunks"] == 3
    assert client.wait(job["id"])["chunks_done"] == 3
    card = client.models()[0]
    assert card["chunks"] == {"frames_per_chunk": 2, "max_chunks": MAX_CHUNKS, "attended_chunks": 3}


def test_delete_stops_a_causal_job_and_frees_its_chunks(client, gate, server):
    job = client.create(PROMPT + " [gate]", num_chunks=4, seed=2, **FAST)
    assert gate.waiting.wait(60)
    folder = server.jobs.get(job["id"]).job.chunk_dir
    assert folder is not None and len(list(folder.iterdir())) == 2
    client.delete(job["id"])
    assert wait_until(lambda: client.retrieve(job["id"])["status"] == "cancelled", timeout=30)
    assert wait_until(lambda: not folder.exists(), timeout=10)
    with pytest.raises(APIError) as err:
        client.chunk(job["id"], 0)
    assert err.value.status_code == 404 and "deleted" in err.value.message
