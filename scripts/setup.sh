#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU torch wheel first (a bare
# `torch` requirement would pull a multi-GB CUDA build), the project with its dev extra, and
# the real Fashion-MNIST data set (Debian package dataset-fashion-mnist).
# Usage: bash scripts/setup.sh           (idempotent; re-running only fills what is missing)
# GPU users: create the venv with their CUDA torch already installed, then
#   pip install -e ".[gpu,dev]"
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# pip byte-compiles ~20k files on one core; --no-compile plus compileall on every core below
# does the same work in about half the time (the .pyc files matter: with
# PYTHONDONTWRITEBYTECODE set, as on CI, every process would otherwise recompile on import).
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
fi
.venv/bin/python -m pip install -q --no-compile -e ".[dev]"
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# A few packages ship files that are not Python 3 source (templates, examples); pip skips them
# too, so their errors are not failures.
.venv/bin/python -m compileall -q -j 0 "$SITE" mixersnn trainers search >/dev/null 2>&1 || true

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "Fashion-MNIST is missing from $FMNIST. Install it with:" >&2
        echo "    sudo apt-get install dataset-fashion-mnist" >&2
        echo "or put the four idx .gz files somewhere and pass --data-dir to mixersnn." >&2
    fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, mixersnn; print("torch", torch.__version__, "mixersnn", mixersnn.__version__)')"
