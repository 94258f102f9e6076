#!/usr/bin/env bash
# The GPU session on the device, from the repository root: install the carried wheels (made by
# benchmarks/gpu_wheels.sh) and gsae without any registry, then run every stage in 9 minutes.
#   bash benchmarks/gpu_session.sh "$OUT" [more gpu_session.py flags]
# The device tool's one-line call (carry: [".gpu_wheels"], timeout_s 600; the device's copy of
# the tree has no .git, so the commit is given from here):
#   GSAE_COMMIT=<git rev-parse --short HEAD> bash benchmarks/gpu_session.sh "$OUT" --budget 540
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_session.sh OUT [flags]}
shift
wheels=.gpu_wheels
export GSAE_COMMIT=${GSAE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -d "$wheels" ]; then
    # sparsify and what it imports (setuptools, wheel, packaging: only for the build below)
    pip install -q --no-index --find-links "$wheels" --no-deps \
        $(ls "$wheels"/*.whl | grep -v -e /setuptools- -e /wheel- -e /packaging-) \
        || echo "gpu_session.sh: the carried wheels did not all install" >&2
    # gsae itself, its build backend (setuptools, wheel) from the carried wheels too
    pip install -q --no-index --find-links "$wheels" --no-deps -e . \
        || echo "gpu_session.sh: gsae not installed: gpu_session.py runs it from the tree" >&2
else
    echo "gpu_session.sh: no $wheels (run benchmarks/gpu_wheels.sh and carry it)" >&2
fi
python benchmarks/gpu_session.py --out "$out" "$@"
