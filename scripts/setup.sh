#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU torch wheel first (a bare
# `torch` requirement would pull a multi-GB CUDA build), the project with its dev extra, and
# the real Fashion-MNIST data set (Debian package dataset-fashion-mnist).
# Usage: bash scripts/setup.sh           (idempotent; re-running only fills what is missing)
#        bash scripts/setup.sh --tests   also what only the tests need (chromium, as root)
# GPU users: create the venv with their CUDA torch already installed, then
#   pip install -e ".[gpu,dev]"
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=0
for arg in "$@"; do
    case "$arg" in
        --tests) TESTS=1 ;;
        *) echo "scripts/setup.sh: unknown argument '$arg' (allowed: --tests)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# pip for the torch wheel (uv does not look in the machine's local wheel folder), uv for the
# rest: it downloads and installs in parallel (about 15 s against 60 s for pip, fresh machine).
.venv/bin/python -m pip install -q --upgrade pip uv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
fi
.venv/bin/uv pip install -q --python .venv/bin/python -e ".[dev]"
# Bytecode: with PYTHONDONTWRITEBYTECODE set (as on CI) every process would compile each module
# it imports, every time; compiling all ~20k files ahead took 70 s on 2 cores. Instead, in this
# venv only, such processes keep their bytecode under .venv/pycache (never beside the sources):
# a module is compiled once, by the first process that imports it (about 7k of the ~20k files over the whole test suite).
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$SITE/_mixersnn_venv_bytecode.pth" <<'PTH'
import sys, os; sys.dont_write_bytecode and not sys.pycache_prefix and (setattr(sys, "pycache_prefix", os.path.join(sys.prefix, "pycache")), setattr(sys, "dont_write_bytecode", False))
PTH

FMNIST="${MIXERSNN_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "Fashion-MNIST is missing from $FMNIST. Install it with:" >&2
        echo "    sudo apt-get install dataset-fashion-mnist" >&2
        echo "or put the four idx .gz files in a folder and set MIXERSNN_FASHION_MNIST=/that/folder." >&2
    fi
fi
# Debian's chromium, for the browser test of the MLflow UI (tests/test_mlflow_review.py drives
# it headless), with --tests only: the main job does not need it. Without recommends (desktop
# extras the headless test does not use), one font.
if [ "$TESTS" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-cache show chromium >/dev/null 2>&1 || apt-get update -qq
        apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
    else
        echo "chromium is missing: the MLflow UI browser test will skip. Install it with:" >&2
        echo "    sudo apt-get install chromium" >&2
    fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, mixersnn; print("torch", torch.__version__, "mixersnn", mixersnn.__version__)')"
