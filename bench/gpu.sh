#!/usr/bin/env bash
# One-call GPU benchmark: GPU check, throughput, 1/4/8 concurrent quarter-GPU trials, a ~7-minute
# seed-recipe baseline, a short PTQ + QAT sweep. Exits well inside 10 minutes on an H200.
#   bash bench/gpu.sh OUT_DIR [--tiny] [--train-minutes M]     (DATA=path/to/cifar10 to override the data)
#   bash bench/gpu.sh --unpack DIR     unpack the carried parts of bench/gpu_bundle.py (DIR/part-*.tar.xz) into
#                                      .gpu-site/ (kept between calls while the machine stays warm), then exit
# Packages in .gpu-site/ (ray, optuna, mlflow, ... for Python 3.12) come before the machine's own.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
site="$here/../.gpu-site"
if [ "${1:-}" = "--unpack" ]; then
    dir="${2:?usage: bench/gpu.sh --unpack DIR}"
    mkdir -p "$site"
    shopt -s nullglob
    parts=("$dir"/part-*.tar.xz)
    [ ${#parts[@]} -gt 0 ] || { echo "gpu.sh: no part-*.tar.xz in $dir" >&2; exit 2; }
    for p in "${parts[@]}"; do tar -xJf "$p" -C "$site"; echo "unpacked $p"; done
    exit 0
fi
out="${1:?usage: bench/gpu.sh OUT_DIR [--tiny] [--train-minutes M]}"
shift
PY="${PY:-$(command -v python3)}"
[ -x "$here/../.venv/bin/python" ] && PY="$here/../.venv/bin/python"
[ -d "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
args=(--out "$out")
[ -n "${DATA:-}" ] && args+=(--data "$DATA")
exec "$PY" "$here/gpu_bench.py" "${args[@]}" "$@"
