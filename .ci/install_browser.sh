#!/usr/bin/env bash
# CI: installs what tests/test_browser.py needs: headless Chromium and its WebDriver, and FFmpeg (ffmpeg + ffprobe:
# Gradio's streaming video output, the page's Stream tab) (Debian packages).
# Idempotent: does nothing when all are already on PATH. Needs root (or sudo) and the Debian package mirror.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
        && command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then
    echo "[browser] chromium, chromedriver and ffmpeg already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "[browser] need root to install chromium chromium-driver ffmpeg (apt-get)" >&2; exit 1
    fi
fi
echo "[browser] installing chromium chromium-driver ffmpeg (Debian)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver ffmpeg \
    >/dev/null
echo "[browser] $(chromium --version 2>/dev/null | head -1); $(chromedriver --version | head -1); $(ffmpeg -version | head -1)"
