"""bench.gpu: the GPU sequence runs end to end on CPU (--dry-run), every part writes its JSON, and budgets hold: a part
with no budget left is skipped with a note, one that overruns is killed, and the command still writes its summary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu
from bench.common import machine_tag

ROOT = Path(__file__).resolve().parent.parent


def _summary(out: Path) -> dict:
    return json.loads((out / f"gpu-{machine_tag()}.json").read_text())


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_its_json(tmp_path):
    # --in-process: the benchmark parts share one import of torch and diffusers (~8 s each on 2 busy cores); the
    # pytest part, and a part past its budget (test below), still run through the process path the GPU run takes
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--in-process", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(tmp_path)
    rows = {row["part"]: row for row in summary["rows"]}
    assert list(rows) == [part.name for part in gpu.PARTS]
    for part in gpu.PARTS:
        assert rows[part.name]["status"] == "ok", rows[part.name]
        payload = json.loads((tmp_path / f"{part.result}-{machine_tag()}.json").read_text())
        assert payload["rows"], part.name  # each part measured something
    tests = json.loads((tmp_path / f"gpu-tests-{machine_tag()}.json").read_text())["rows"][0]
    assert tests["skipped"] > 0 and tests.get("failed", 0) == 0  # the GPU tests were collected (and skip on CPU)
    assert "sliding_tile" in summary["meta"]["available"]  # which implementation each backend runs, recorded
    assert (tmp_path / summary["meta"]["log"]).read_text().count("=====") >= len(gpu.PARTS)


def test_part_with_no_budget_is_skipped_with_a_note(tmp_path):
    rows = gpu.main(["--dry-run", "--out", str(tmp_path), "--parts", "tests,cache", "--budgets", "tests=0,cache=0"])
    assert [(row["part"], row["status"]) for row in rows] == [("tests", "skipped"), ("cache", "skipped")]
    assert all("budget is 0" in row["note"] for row in rows)
    assert _summary(tmp_path)["rows"] == json.loads(json.dumps(rows))


def test_spent_overall_budget_skips_the_rest(tmp_path):
    rows = gpu.main(["--dry-run", "--out", str(tmp_path), "--budget", "0"])
    assert [row["part"] for row in rows] == [part.name for part in gpu.PARTS]
    assert all(row["status"] == "skipped" and "overall budget is spent" in row["note"] for row in rows)


def test_a_part_past_its_budget_is_killed(tmp_path):
    with open(tmp_path / "log", "w") as log:
        rc, seconds, output = gpu.run_logged([sys.executable, "-c", "print('started', flush=True); "
                                              "import time; time.sleep(60)"], 2.0, log, env=None)
    assert rc is None and seconds < 30 and "started" in output


def test_pytest_summary_counts():
    assert gpu.test_counts("..\n3 passed, 1 skipped, 80 deselected in 9.12s\n") == {
        "passed": 3, "skipped": 1, "deselected": 80}
    assert gpu.test_counts("== 1 failed, 2 passed, 1 error in 3.0s ==") == {"failed": 1, "passed": 2, "error": 1}


def test_bad_budget_names_the_parts():
    with pytest.raises(SystemExit, match="attention"):
        gpu.main(["--dry-run", "--budgets", "atention=5"])


def test_attention_bench_keeps_timing_when_one_kernel_fails(tmp_path, monkeypatch):
    """A kernel whose first call raises (a wheel built for another torch, say) gets a row naming the error; the
    others are still timed against SDPA, and the JSON is written."""
    import bench.attention
    import bench.common
    from vdiff.attention.radial import RadialBackend

    def broken(self, q, k, v, ctx):
        raise NotImplementedError("No operator found for this test\nmore lines")

    monkeypatch.setattr(RadialBackend, "forward", broken)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    rows = bench.attention.main(["--shapes", "cpu", "--grid", "2,8,8", "--methods", "radial", "sliding_tile",
                                 "--impls", "gather", "--kernels", "sdpa", "--repeats", "1", "--warmup", "0",
                                 "--no-backward"])
    radial = [row for row in rows if row["method"] == "radial"]
    timed = [row for row in rows if row["method"] == "sliding_tile"]
    assert radial and all(row["error"] == "No operator found for this test" for row in radial)
    assert timed and all(row["fwd_ms"] > 0 and "error" not in row for row in timed)
    assert any(row["method"] == "dense:sdpa" and row["x_sdpa"] == 1.0 for row in rows)
    assert json.loads((tmp_path / f"attention-{machine_tag()}.json").read_text())["rows"] == json.loads(
        json.dumps(rows, default=str))
