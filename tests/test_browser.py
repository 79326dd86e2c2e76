"""The page in a real browser: headless Chromium loads it, runs a generation, and a screenshot is saved.

Needs Debian's `chromium` and `chromium-driver` (.ci/install_browser.sh) and selenium. Without them the test skips
with the reason, except under CI (CI=true), where it fails: CI must run it for real.
Screenshots go to test-artifacts/ (browser-generation.png: the Clip page; browser-stream.png: the Stream tab of the
bundled causal model); VDIFF_UPDATE_SCREENSHOT=1 also writes docs/screenshot.png (the README's: the Stream tab).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _serve_helpers import decode_video, save_tiny_pipeline

from serve.app import serve
from vdiff.runtime import BUNDLED_CHECKPOINT, bundled_causal_checkpoint, free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
         "--window-size=1280,1000", "--hide-scrollbars"]


def _missing() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "headless Chromium not installed (run .ci/install_browser.sh: Debian chromium + chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def driver():
    reason = _missing()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vdiff-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The bundled model (what `./launch.sh demo` serves, so the screenshot shows a real generation); a random tiny
    # pipeline only if a checkout has no bundled checkpoint.
    checkpoint = BUNDLED_CHECKPOINT if (BUNDLED_CHECKPOINT / "vdiff.json").is_file() else save_tiny_pipeline(
        tmp_path_factory.mktemp("browser") / "tiny-pipeline")
    srv = serve(checkpoint, port=free_port(), block=False, quiet=True)
    yield srv
    srv.close()


@pytest.mark.slow
def test_page_loads_generates_and_shows_the_video(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(server.url)
    prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#vdiff-prompt textarea")))
    assert "vdiff" in driver.title
    for label in ("Prompt", "Negative prompt", "Seed", "Steps", "Guidance", "Frames", "Height", "Width", "Attention",
                  "Caches", "Generate", "Cancel", "Examples"):
        assert label in driver.find_element(By.TAG_NAME, "body").text, label

    prompt.send_keys("a red circle moving right")
    steps = driver.find_element(By.CSS_SELECTOR, "#vdiff-steps input")
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys("20")
    seed = driver.find_element(By.CSS_SELECTOR, "#vdiff-seed input")
    seed.send_keys(Keys.CONTROL, "a")
    seed.send_keys("42", Keys.ENTER)
    completed = server.pool.status()["completed"]
    driver.find_element(By.CSS_SELECTOR, "#vdiff-generate").click()

    # The stats line fills in when the generation is done; the video element then plays the served mp4.
    wait.until(lambda d: "seed 42" in d.find_element(By.CSS_SELECTOR, "#vdiff-stats textarea").get_attribute("value"))
    stats = driver.find_element(By.CSS_SELECTOR, "#vdiff-stats textarea").get_attribute("value")
    assert "20 steps" in stats and "attention dense" in stats, stats
    video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vdiff-video video"))
    src = video.get_attribute("src")
    assert src and "/gradio_api/file=" in src and src.endswith(".mp4"), src
    wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 2 && arguments[0].videoWidth", video))
    cfg = server.pool.pipelines[0].config  # the page's defaults are the checkpoint's
    scale = server.pool.display_scale  # a 16 x 16 model is shown upscaled, nearest neighbour
    assert scale == 16
    size = driver.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video)
    assert size == [cfg.width * scale, cfg.height * scale], size
    assert server.pool.status()["completed"] == completed + 1

    link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vdiff-original a"))
    original = next(p for p in server.pool.store.files() if p.name in link.get_attribute("href"))
    frames = decode_video(original)  # the download: model resolution
    assert frames.shape == (cfg.num_frames, cfg.height, cfg.width, 3)
    shown = decode_video(src.split("file=", 1)[1])
    assert shown.shape == (cfg.num_frames, cfg.height * scale, cfg.width * scale, 3)
    block = shown[:, 5 * scale:6 * scale, 7 * scale:8 * scale].astype(int)  # one model pixel: a flat block
    assert np.abs(block - block[:, 2:3, 2:3]).max() <= 12

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-generation.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("VDIFF_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "screenshot.png")


@pytest.fixture(scope="module")
def causal_server(tmp_path_factory):
    checkpoint = (bundled_causal_checkpoint()
                  or save_tiny_pipeline(tmp_path_factory.mktemp("browser") / "tiny-causal", causal=True))
    srv = serve(checkpoint, port=free_port(), block=False, quiet=True, max_chunks=48)
    yield srv
    srv.close()


def _value(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value") or ""


@pytest.mark.slow
def test_stream_tab_plays_chunks_takes_a_prompt_change_and_stops(driver, causal_server):
    """The bundled causal model streams on the page: chunks arrive (progress line, segments in the streaming video),
    a prompt typed while it runs takes over at the next chunk, and Stop ends the job."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    srv = causal_server
    wait = WebDriverWait(driver, 90)
    driver.get(srv.url)
    prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#vdiff-stream-prompt textarea")))
    body = driver.find_element(By.TAG_NAME, "body").text
    for label in ("Stream", "Clip", "Chunks", "Until stopped", "Stop", "Change the prompt"):
        assert label in body, label
    prompt.send_keys("a red circle moving right")
    steps = driver.find_element(By.CSS_SELECTOR, "#vdiff-stream-steps input")
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys("20")
    driver.find_element(By.CSS_SELECTOR, "#vdiff-stream-forever input").click()
    cancelled = srv.pool.status()["cancelled"]
    driver.find_element(By.CSS_SELECTOR, "#vdiff-stream-start").click()

    progress = "#vdiff-stream-progress textarea"
    wait.until(lambda d: "chunk 2 of 48" in _value(d, progress) or " of 48" in _value(d, progress)
               and int(_value(d, progress).split()[1]) >= 2)
    driver.find_element(By.CSS_SELECTOR, "#vdiff-stream-next textarea").send_keys("a red circle moving up")
    driver.find_element(By.CSS_SELECTOR, "#vdiff-stream-change").click()
    wait.until(lambda d: _value(d, "#vdiff-stream-notice textarea").startswith("chunk "))
    at = int(_value(driver, "#vdiff-stream-notice textarea").split()[1].rstrip(":"))
    wait.until(lambda d: "prompt: a red circle moving up" in _value(d, progress))  # the switched chunk arrived
    shown = int(_value(driver, progress).split()[1])
    assert shown >= at + 1  # chunk `at` (0-based) is the first made by the new prompt
    wait.until(lambda d: "2 segment(s)" in _value(d, progress) or "3 segment(s)" in _value(d, progress))
    video = driver.find_element(By.CSS_SELECTOR, "#vdiff-stream-video video")
    assert video.get_attribute("src") or video.get_attribute("currentSrc") or driver.execute_script(
        "return !!arguments[0].srcObject || arguments[0].readyState > 0", video)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-stream.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("VDIFF_UPDATE_SCREENSHOT"):
        shutil.copy(shot, ROOT / "docs" / "screenshot.png")

    driver.find_element(By.CSS_SELECTOR, "#vdiff-stream-stop").click()
    wait.until(lambda d: srv.pool.status()["cancelled"] == cancelled + 1)
    assert int(_value(driver, progress).split()[1]) < 48  # stopped before the limit
