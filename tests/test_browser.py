"""The page in a real browser: headless Chromium loads it, runs a generation, and a screenshot is saved.

Needs Debian's `chromium` and `chromium-driver` (.ci/install_browser.sh) and selenium. Without them the test skips
with the reason, except under CI (CI=true), where it fails: CI must run it for real.
The screenshot goes to test-artifacts/browser-generation.png; VDIFF_UPDATE_SCREENSHOT=1 also writes
docs/screenshot.png (the one in the README).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from _serve_helpers import decode_video, save_tiny_pipeline

from serve.app import serve
from vdiff.runtime import BUNDLED_CHECKPOINT, free_port

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
    size = driver.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video)
    assert size == [cfg.width, cfg.height], size
    assert server.pool.status()["completed"] == completed + 1

    served = server.pool.store.files()[-1]
    assert decode_video(served).shape == (cfg.num_frames, cfg.height, cfg.width, 3)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-generation.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("VDIFF_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "screenshot.png")
