"""The `/v1/videos` job API, driven by real HTTP clients (httpx, vdiff.client) against a real server on loopback.

Same server as the page (serve.app.serve: one process, one WorkerPool, the real tiny pipeline from disk). Requests
are 2-3 steps of 8 x 32 x 32; held requests ([hold], tests/_serve_helpers) wait at their first step, so the order of
events is asserted, never their timing.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
from _serve_helpers import HOLD, StepControl, decode_video, save_tiny_pipeline, wait_until

from serve.api import MAX_BODY_BYTES, add_api
from serve.app import QUEUE_KWARGS, build_app, launch_kwargs, serve
from serve.jobs import JobStore, VideoJob
from serve.validation import limits_for, validate_request
from vdiff.client import APIError, JobFailed, VideoClient
from vdiff.runtime import free_port

FAST = dict(num_inference_steps=2, num_frames=8, height=32, width=32)
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("jobs") / "tiny-pipeline")


@pytest.fixture(scope="module")
def control() -> StepControl:
    return StepControl()


@pytest.fixture(scope="module")
def server(checkpoint, control):
    srv = serve(checkpoint, port=free_port(), max_queue=MAX_QUEUE, max_outputs=8, block=False, quiet=True,
                step_hooks=[control], display_scale=1)  # the page's /generate serves the frames as generated
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    with VideoClient(server.url) as c:
        yield c


@pytest.fixture(autouse=True)
def _released(control, server):
    control.release.clear()
    assert wait_until(lambda: _idle(server), timeout=60)
    yield
    control.release.set()  # never leave a held request behind


def _idle(server) -> bool:
    s = server.pool.status()
    return s["running"] == 0 and s["waiting"] == 0


def _post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}v1/videos", json=body, timeout=30, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# A job's life
# ---------------------------------------------------------------------------------------------------------------------


def test_create_then_events_then_content(server, client, tmp_path):
    r = _post(server, {"prompt": "a red circle moving right", "seed": 7, **FAST, "num_inference_steps": 3})
    assert r.status_code == 201, r.text
    job = r.json()
    # a snapshot: the idle worker may already have started the job before the reply was written
    assert job["status"] in ("queued", "in_progress", "completed") and job["seed"] == 7
    assert job["status"] != "queued" or job["progress"] == 0
    assert job["id"].startswith("video_") and len(job["id"]) >= 20
    assert str(server.pool.store.root) not in r.text  # outputs are reachable only through their job

    events = list(client.events(job["id"]))
    names = [name for name, _ in events]
    assert names[-1] == "completed" and names.count("completed") == 1 and "failed" not in names
    progress = [data["progress"] for _, data in events]
    assert progress == sorted(progress) and progress[-1] == 100
    steps = [data["steps_done"] for name, data in events if name == "progress"]
    assert [s for s in steps if s] == [1, 2, 3]  # one event per denoising step, each a real step done
    assert any(d["status"] == "in_progress" for _, d in events)

    done = client.retrieve(job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["num_steps"] == 3
    assert done["timings"]["run_s"] > 0 and done["completed_at"] >= done["started_at"] >= done["created_at"]
    path = tmp_path / "clip.mp4"
    path.write_bytes(client.content(job["id"]))
    assert decode_video(path).shape == (8, 32, 32, 3)
    assert job["id"] in [j["id"] for j in client.list()]


def test_generate_returns_the_mp4_of_the_page_for_the_same_request(server, client, tmp_path):
    """The API and the page run the same pipeline through the same pool: same request, same file content."""
    path = client.generate("a blue square moving up", seed=3, path=tmp_path / "api.mp4", **FAST)
    from gradio_client import Client

    video, _, stats = Client(server.url, verbose=False).predict(prompt="a blue square moving up", seed=3, **FAST,
                                                                api_name="/generate")
    page = video["video"] if isinstance(video, dict) else video
    assert (decode_video(path) == decode_video(page)).all() and stats["seed"] == 3


def test_unknown_ids_are_404(server, client):
    for method, suffix in (("GET", ""), ("GET", "/content"), ("GET", "/events"), ("DELETE", ""),
                           ("GET", "/chunks/0")):
        r = httpx.request(method, f"{server.url}v1/videos/video_nope{suffix}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", (method, suffix, r.text)


def test_bidirectional_model_has_no_chunks_and_content_404_before_it_exists(server, client, control):
    job = client.create(f"{HOLD} waiting for content", seed=1, **FAST)
    assert wait_until(control.held.is_set, timeout=60)
    with pytest.raises(APIError) as err:
        client.content(job["id"])
    assert err.value.status_code == 404 and "in_progress" in err.value.message
    with pytest.raises(APIError) as err:
        client.chunk(job["id"], 0)
    assert err.value.status_code == 404 and "not a causal model" in err.value.message
    control.release.set()
    assert client.wait(job["id"])["status"] == "completed"
    assert len(client.content(job["id"])) > 0


def test_models_names_the_checkpoint_and_its_limits(server, client):
    (model,) = client.models()
    assert model["id"] == "tiny-pipeline" and model["causal"] is False
    lim = model["limits"]
    assert lim["num_inference_steps"]["max"] == 100 and lim["height"]["multiple"] == 8
    assert lim["max_queue"] == MAX_QUEUE and "dense" in lim["attention"]


# ---------------------------------------------------------------------------------------------------------------------
# Cancel, disconnect, flood
# ---------------------------------------------------------------------------------------------------------------------


def test_a_job_that_started_before_its_record_existed_reads_in_progress(server, control):
    """The pool's worker may start a job before the API wraps it in a VideoJob (the CI race of stop 25): the record
    must still see the start, not stay 'queued' until the next step."""
    request = validate_request(limits_for(server.pool.pipelines[0]), prompt=f"{HOLD} started first", seed=1, **FAST)
    job = server.pool.submit(request)
    assert wait_until(control.held.is_set, timeout=60)  # running, held at step 0: no further notice until released
    vj = VideoJob(job, "tiny-pipeline")
    assert vj.status == "in_progress" and vj.started_at is not None
    control.release.set()
    job.wait(timeout=60)  # returns when the job is done, possibly before its listeners have run
    assert wait_until(lambda: vj.status == "completed", timeout=10) and vj.progress == 100


def test_delete_of_a_running_job_frees_the_worker_for_the_next(server, client, control):
    before = server.pool.status()
    job = client.create(f"{HOLD} to be cancelled", seed=1, **FAST)
    assert wait_until(control.held.is_set, timeout=60)
    assert client.retrieve(job["id"])["status"] == "in_progress"
    nxt = client.create("the next one", seed=2, **FAST)  # waits behind the held job
    assert client.retrieve(nxt["id"])["status"] == "queued"
    deleted = client.delete(job["id"])
    assert deleted["deleted"] is True
    assert client.wait(job["id"])["status"] == "cancelled"  # the hold is never released: the cancel stopped it
    assert client.wait(nxt["id"])["status"] == "completed"
    assert server.pool.status()["cancelled"] == before["cancelled"] + 1
    with pytest.raises(APIError) as err:
        client.content(job["id"])
    assert err.value.status_code == 404 and "deleted" in err.value.message


def test_delete_of_a_completed_job_frees_its_output(server, client):
    job = client.wait(client.create("kept then deleted", seed=4, **FAST)["id"])
    path = server.jobs.get(job["id"]).output
    assert path is not None and path.is_file()
    client.delete(job["id"])
    assert not path.exists() and path not in server.pool.store.files()
    with pytest.raises(APIError):
        client.content(job["id"])


def test_disconnecting_from_events_does_not_stop_the_job_but_delete_does(server, client, control):
    kept = client.create(f"{HOLD} followed then left", seed=1, **FAST)
    with contextlib.closing(client.events(kept["id"])) as events:
        for _, data in events:
            if data["status"] == "in_progress":
                break  # closing the stream: the client goes away mid-job
    vj = server.jobs.get(kept["id"])
    assert wait_until(lambda: vj.followers == 0, timeout=30)  # the server saw the follower leave
    assert client.retrieve(kept["id"])["status"] == "in_progress"
    control.release.set()
    assert client.wait(kept["id"])["status"] == "completed"  # it ran to the end without anyone following

    control.release.clear()
    stopped = client.create(f"{HOLD} followed then deleted", seed=2, **FAST)
    names, deleted = [], False
    with VideoClient(server.url) as other:
        for name, data in client.events(stopped["id"]):  # followed to the end while another client deletes it
            names.append(name)
            if data["status"] == "in_progress" and not deleted:
                other.delete(stopped["id"])
                deleted = True
    assert names[-1] == "cancelled" and "completed" not in names
    assert client.retrieve(stopped["id"])["status"] == "cancelled"


def test_flood_gets_429_beyond_the_queue_and_the_accepted_ones_still_run(server, client, control):
    held = client.create(f"{HOLD} flood head", seed=0, **FAST)
    assert wait_until(control.held.is_set, timeout=60)
    answers = [_post(server, {"prompt": f"flood {i}", "seed": i, **FAST}) for i in range(8)]
    codes = [r.status_code for r in answers]
    assert codes == [201] * MAX_QUEUE + [429] * (8 - MAX_QUEUE), codes
    busy = answers[-1]
    assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["type"] == "server_busy"
    control.release.set()
    for r in [held, *(a.json() for a in answers[:MAX_QUEUE])]:
        assert client.wait(r["id"])["status"] == "completed"
    assert client.generate("after the flood", seed=9, **FAST)  # and the server keeps serving


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------

BAD = [
    ({"prompt": ""}, "prompt"),
    ({"negative_prompt": "x"}, "prompt"),  # no prompt at all
    ({"prompt": "x" * 501}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "ok", "negative_prompt": "n" * 501}, "negative_prompt"),
    ({"prompt": "ok", "num_frames": "ten"}, "num_frames"),
    ({"prompt": "ok", "num_frames": 8.5}, "num_frames"),
    ({"prompt": "ok", "num_frames": None}, "num_frames"),
    ({"prompt": "ok", "num_frames": 256, "height": 256, "width": 256}, "num_frames"),
    ({"prompt": "ok", "height": 33}, "height"),
    ({"prompt": "ok", "width": -32}, "width"),
    ({"prompt": "ok", "num_inference_steps": 101}, "num_inference_steps"),
    ({"prompt": "ok", "num_inference_steps": True}, "num_inference_steps"),
    ({"prompt": "ok", "guidance_scale": "nan"}, "guidance_scale"),
    ({"prompt": "ok", "guidance_scale": [5]}, "guidance_scale"),
    ({"prompt": "ok", "seed": "lucky"}, "seed"),
    ({"prompt": "ok", "attention": "nope"}, "attention"),
    ({"prompt": "ok", "cache": "text_kv"}, "cache"),
    ({"prompt": "ok", "cache": ["nope"]}, "cache"),
    ({"prompt": "ok", "steps": 4}, "steps"),  # unknown parameter (the name is num_inference_steps)
    ({"prompt": "ok", "num_chunks": 3}, "num_chunks"),  # this model is not causal
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_parameter(server, body, param):
    before = server.pool.status()["submitted"]
    r = _post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(param), err
    assert server.pool.status()["submitted"] == before  # rejected before reaching the queue


def test_malformed_and_oversized_bodies(server, client):
    for content in (b"{not json", b"[1, 2]", b'"a prompt"'):
        r = httpx.post(f"{server.url}v1/videos", content=content, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    big = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 1)})
    r = httpx.post(f"{server.url}v1/videos", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    assert client.retrieve(client.create("still serving", seed=1, **FAST)["id"])["id"]


def test_a_failed_job_reports_why(server, client):
    from _serve_helpers import OOM

    with pytest.raises(JobFailed) as err:
        client.generate(f"{OOM} too big", seed=1, **FAST)
    assert err.value.job["status"] == "failed" and err.value.job["error"]["type"] == "out_of_memory"


# ---------------------------------------------------------------------------------------------------------------------
# Login and exposure
# ---------------------------------------------------------------------------------------------------------------------


def test_auth_protects_the_api(server):
    auth = ("alice", "s3cret")
    limits = limits_for(server.pool.pipelines[0])
    app = build_app(server.pool, limits)
    port = free_port()
    app.queue(**QUEUE_KWARGS).launch(server_name="127.0.0.1", server_port=port, auth=auth, prevent_thread_lock=True,
                                     quiet=True, **launch_kwargs(server.pool))
    add_api(app.app, JobStore(server.pool, "tiny-pipeline"), limits, auth=auth)
    url = f"http://127.0.0.1:{port}"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YWxpY2U6d3Jvbmc="}):
            r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
            assert r.headers["www-authenticate"].startswith("Basic")
        assert httpx.post(f"{url}/v1/videos", json={"prompt": "x"}, timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/models", auth=auth, timeout=30).status_code == 200
        for token in ("s3cret", "alice:s3cret"):
            with VideoClient(url, token=token) as c:
                assert c.models()[0]["id"] == "tiny-pipeline"
        with VideoClient(url, token="s3cret") as c:
            assert len(c.generate("behind a login", seed=1, **FAST)) > 0
    finally:
        app.close()


def test_open_host_without_login_refuses_to_start(checkpoint, monkeypatch, capsys):
    from serve.__main__ import main, open_server_refusal

    monkeypatch.delenv("VDIFF_AUTH", raising=False)
    assert main(["--checkpoint", str(checkpoint), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on --host 0.0.0.0 without a login" in err and "VDIFF_AUTH" in err and "--no-auth" in err
    assert open_server_refusal("0.0.0.0", None, no_auth=True) is None
    assert open_server_refusal("0.0.0.0", ("a", "b"), no_auth=False) is None
    assert open_server_refusal("127.0.0.1", None, no_auth=False) is None
