#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py says what it runs), from the source tree, no install:
#   bash scripts/gpu_check.sh --out "$OUT"      on a GPU machine (7.5 minutes at most)
#   bash scripts/gpu_check.sh --tiny --out DIR  every step on CPU, tiny (tests/test_gpu_check.py)
# Wheels in .whl/ (packages an offline machine lacks, downloaded beforehand: docs/gpu.md) are
# installed into /tmp/site first, without an index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
