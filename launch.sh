#!/usr/bin/env bash
# vdiff: the one entry point. `./launch.sh help` lists the subcommands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VDIFF_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# CPU wheel used where no GPU is present (a local file on these machines; a user can point pip at another index
# with VDIFF_TORCH_INDEX_URL).
TORCH_CPU_VERSION="${VDIFF_TORCH_CPU_VERSION:-2.13.0}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # nothing is downloaded at run time
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export DS_BUILD_OPS="${DS_BUILD_OPS:-0}"       # deepspeed: no kernel builds at install time
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}"
# The repository root on the path: bench/ and experiments/ are run as modules from the checkout, not installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# GPU machines only (the `cuda` extra installs xformers): xformers refuses to import next to a flash-attn newer than
# the versions it lists, and diffusers imports it at start-up, so without this a newer flash-attn breaks every command.
export XFORMERS_IGNORE_FLASH_VERSION_CHECK=1

usage() {
    cat <<EOF
usage: ./launch.sh COMMAND [ARGS...]

  setup                 create .venv and install vdiff (CPU torch where there is no GPU; an existing CUDA torch is kept)
  test [PYTEST ARGS]    lint (ruff) and run the test suite (installs first if needed)
  sample [--checkpoint DIR] --prompt TEXT --out FILE [key=value ...]
                        generate a video (.mp4/.gif/.webm); ./launch.sh sample --help lists the settings
                        [--nproc N] [--nodes ...as train] parallel.cfg=2 parallel.ulysses=K: one video on N = cfg x K
                        processes (torchrun; rank 0 writes the file)
  train --config FILE [--nproc N] [--nodes N --node-rank R --master-addr HOST --master-port P] [key=value ...]
                        train with torchrun: one process per GPU (--nproc defaults to the GPU count, 1 on CPU);
                        multi-node: run the same command on every node with its --node-rank
  eval [--checkpoint DIR] [--out FILE] [key=value ...]
                        generate clips over the ShapesWorld grammar and score them (default: checkpoints/shapes-tiny;
                        num_clips= steps= guidance= attention= seed= batch_size=); ./launch.sh eval --help
  bench NAME [ARGS]     run a benchmark: prints a table, writes JSON under bench/results/
                        NAME is one of: $(bench_names)
  serve --checkpoint DIR [--host 127.0.0.1] [--port 7860]
                        web UI + /generate API for a pipeline folder (VDIFF_AUTH=user:pass for a login)
  demo [ARGS]           serve the bundled tiny model on http://127.0.0.1:7860 (no download, no GPU)
  help                  this message

Every command except help runs setup first when .venv is missing.
Environment: VDIFF_VENV (venv path), PYTHON (interpreter for the venv), VDIFF_TORCH_INDEX_URL (pip index for torch).
EOF
}

bench_names() { (cd "$ROOT/bench" && ls -1 [a-z]*.py 2>/dev/null | sed 's/\.py$//' | grep -v '^common$' | paste -sd' ' -); }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
    local stamp="$VENV/.vdiff-installed" want
    want="$(cat "$ROOT/pyproject.toml" | cksum)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi

    if [ ! -x "$VENV/bin/python" ]; then
        # A system torch built for CUDA is reused rather than replaced: the venv sees system packages.
        if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1; then
            echo "[setup] reusing the system's CUDA torch (venv with --system-site-packages)"
            "$PYTHON" -m venv --system-site-packages "$VENV"
        else
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    local py="$VENV/bin/python"
    "$py" -m pip install -q --upgrade pip >/dev/null

    if "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1; then
        echo "[setup] keeping CUDA torch $("$py" -c 'import torch; print(torch.__version__)')"
    elif "$py" -c 'import torch' >/dev/null 2>&1 && ! has_gpu; then
        echo "[setup] keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
    elif has_gpu; then
        echo "[setup] GPU found: installing CUDA torch"
        "$py" -m pip install -q torch ${VDIFF_TORCH_INDEX_URL:+--index-url "$VDIFF_TORCH_INDEX_URL"}
    else
        echo "[setup] no GPU: installing CPU torch $TORCH_CPU_VERSION"
        "$py" -m pip install -q "torch==$TORCH_CPU_VERSION" ${VDIFF_TORCH_INDEX_URL:+--index-url "$VDIFF_TORCH_INDEX_URL"}
    fi

    # Pin torch to what is installed now, so no dependency can swap it for another build.
    local constraints="$VENV/torch-constraint.txt"
    "$py" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$constraints"
    # GPU-only kernels (xformers) come as the `cuda` extra: on a CPU machine they would only print import warnings.
    local extras="dev"
    if has_gpu; then extras="dev,cuda"; fi
    echo "[setup] installing vdiff and its dependencies (extras: $extras)"
    PIP_CONSTRAINT="$constraints" "$py" -m pip install -q -e "$ROOT[$extras]"
    echo "$want" >"$stamp"
    echo "[setup] done: $("$py" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
}

ensure_setup() { setup; }

vpy() { "$VENV/bin/python" "$@"; }

# torchrun around a module (`train`, `vdiff.sample`). Launcher flags are ours; everything else goes to the module.
# $1: the module; $2: its default process count when --nproc is not given ("gpus": the GPU count, 1 on CPU).
torchrun_cmd() {
    local module="$1" default_nproc="$2"
    shift 2
    local nproc="" nodes=1 node_rank=0 addr=127.0.0.1 port="${MASTER_PORT:-29500}" args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --nproc|--gpus) nproc="$2"; shift 2 ;;
            --nodes) nodes="$2"; shift 2 ;;
            --node-rank) node_rank="$2"; shift 2 ;;
            --master-addr) addr="$2"; shift 2 ;;
            --master-port) port="$2"; shift 2 ;;
            -h|--help) vpy -m "$module" --help; return 0 ;;
            *) args+=("$1"); shift ;;
        esac
    done
    # Settings are checked once here, so a typo is one line and exit 2, not a torchrun failure report.
    vpy -m "$module" --check "${args[@]}" || exit 2
    if [ -z "$nproc" ]; then
        if [ "$default_nproc" = gpus ]; then
            nproc="$(vpy -c 'import torch; print(max(1, torch.cuda.device_count()))')"
        else
            nproc="$default_nproc"
        fi
    fi
    local rdzv=(--standalone)
    if [ "$nodes" -gt 1 ]; then
        rdzv=(--nnodes "$nodes" --node-rank "$node_rank" --master-addr "$addr" --master-port "$port")
    fi
    vpy -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$nproc" -m "$module" "${args[@]}"
}

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup ;;
    test)
        ensure_setup
        cd "$ROOT"
        "$VENV/bin/ruff" check .
        vpy -m pytest -q -rs "$@" ;;
    bench)
        name="${1:-}"
        # A lent GPU machine: CUDA torch in the system Python, no .venv and no package index. bench.gpu runs from
        # the checkout with that Python and installs what is missing from .whl/ offline (setup would need an index).
        if [ "$name" = gpu ] && [ ! -x "$VENV/bin/python" ] \
            && "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
            shift
            cd "$ROOT"
            exec "$PYTHON" -m bench.gpu "$@"
        fi
        ensure_setup
        if [ -z "$name" ] || [ ! -f "$ROOT/bench/$name.py" ] || [ "$name" = common ]; then
            echo "usage: ./launch.sh bench NAME [ARGS]; NAME is one of: $(bench_names)" >&2
            exit 2
        fi
        shift
        cd "$ROOT"
        vpy -m "bench.$name" "$@" ;;
    serve)
        ensure_setup
        cd "$ROOT"
        vpy -m serve "$@" ;;
    demo)
        ensure_setup
        cd "$ROOT"
        vpy -m serve --demo "$@" ;;
    sample)
        ensure_setup
        cd "$ROOT"
        case " $* " in  # one video on several processes: torchrun (parallel.cfg=2 parallel.ulysses=N ...)
            *" --nproc "*|*" --nodes "*) torchrun_cmd vdiff.sample 1 "$@" ;;
            *) vpy -m vdiff.sample "$@" ;;
        esac ;;
    train)
        ensure_setup
        cd "$ROOT"
        torchrun_cmd train gpus "$@" ;;
    eval)
        ensure_setup
        cd "$ROOT"
        vpy -m vdiff.eval "$@" ;;
    help|-h|--help)
        usage ;;
    *)
        echo "unknown command: $cmd" >&2
        usage >&2
        exit 2 ;;
esac
