#!/usr/bin/env bash
# The wheels benchmarks/gpu_session.py needs on a GPU machine that reaches no package registry
# and has torch, triton, transformers, pytest and pytest-benchmark: sparsify (eai-sparsify) and
# what it imports that those do not bring, plus setuptools, wheel and packaging (wheel's) to
# build gsae itself there.
# Downloaded here into .gpu_wheels/ (git-ignored), carried to the device with the device tool's
# `carry: [".gpu_wheels"]` (64 MiB in all: checked below), installed there by gpu_session.sh.
# sparsify's Trainer needs `datasets` (pyarrow, pandas: far over 64 MiB), so it is not brought:
# gpu_session.py imports sparsify.sparse_coder without the package's __init__ (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.gpu_wheels
mkdir -p "$dir"
pure=(eai-sparsify==1.3.3 accelerate simple-parsing docstring-parser natsort schedulefree einops
      setuptools wheel packaging)
pip download -q --no-deps -d "$dir" "${pure[@]}"
# psutil (accelerate's one compiled dependency): an abi3 wheel, any CPython 3 on x86-64 Linux
pip download -q --no-deps -d "$dir" --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3.10 --implementation cp psutil
size=$(du -sb "$dir" | cut -f1)
echo "$dir: $(ls "$dir" | wc -l) wheels, $((size / 1024)) KiB"
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
    echo "over the 64 MiB the device tool carries" >&2
    exit 1
fi
