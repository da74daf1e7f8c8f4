#!/usr/bin/env bash
# The GPU check on one H100/H200: `pytest -m gpu` (tests/test_gpu.py, at most 90 s), then the measurements;
# one table, JSON in bench/results/gpu_check.json, at most 9 minutes.
#   bash bench/gpu_check.sh [--budget S] [--resume] [--only ROW,...] [--list] [--smoke]
# What it runs and how it fits the time: bench/gpu_check.py's docstring. This wrapper only makes the
# small pure-Python wheels in bench/wheels/ (webdataset, braceexpand, tomli; see its README.md) importable
# when the machine lacks them, then runs bench/gpu_check.py, which checks everything else it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import webdataset, braceexpand, tomli" 2>/dev/null && compgen -G "bench/wheels/*.whl" >/dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/evdm-wheels.XXXXXX")
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" bench/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_check.py "$@"
