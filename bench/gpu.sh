#!/usr/bin/env bash
# One-call GPU benchmark: GPU check, throughput, concurrent trials per GPU, a ~7-minute seed-recipe
# baseline, a short PTQ + QAT sweep. Exits well inside 10 minutes on an H200.
#   bash bench/gpu.sh OUT_DIR [--tiny] [--train-minutes M]     (DATA=path/to/cifar10 to override the data)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: bench/gpu.sh OUT_DIR [--tiny] [--train-minutes M]}"
shift
PY="${PY:-$(command -v python3)}"
[ -x "$here/../.venv/bin/python" ] && PY="$here/../.venv/bin/python"
export PYTHONUNBUFFERED=1
args=(--out "$out")
[ -n "${DATA:-}" ] && args+=(--data "$DATA")
exec "$PY" "$here/gpu_bench.py" "${args[@]}" "$@"
