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
    # `python -m pip`: the interpreter that runs the session, whatever `pip` is on PATH (on the
    # first H200 run plain `pip` installed nothing that python could import)
    python -m pip install -q --no-index --find-links "$wheels" --no-deps \
        $(ls "$wheels"/*.whl | grep -v -e /setuptools- -e /wheel- -e /packaging-) \
        || echo "gpu_session.sh: pip did not install the carried wheels" >&2
    if ! python -c "import sparsify.sparse_coder" 2>/dev/null; then
        # no pip, or a refused install: wheels are zip files, and unpacked onto PYTHONPATH
        # they import as installed (.dist-info included)
        site="$PWD/.gpu_site"
        python -c 'import pathlib, sys, zipfile
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    if not whl.name.startswith(("setuptools-", "wheel-", "packaging-")):
        zipfile.ZipFile(whl).extractall(sys.argv[2])' "$wheels" "$site"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_session.sh: the carried wheels unpacked onto PYTHONPATH ($site)" >&2
    fi
    # gsae itself, its build backend (setuptools, wheel) from the carried wheels too
    python -m pip install -q --no-index --find-links "$wheels" --no-deps -e . \
        || echo "gpu_session.sh: gsae not installed: gpu_session.py runs it from the tree" >&2
else
    echo "gpu_session.sh: no $wheels (run benchmarks/gpu_wheels.sh and carry it)" >&2
fi
python benchmarks/gpu_session.py --out "$out" "$@"
