#!/usr/bin/env bash
# One-call GPU benchmark (bench/gpu_bench.py): GPU check, throughput, the width-1.0 reference model trained
# for ~5 minutes with configs/gpu.yaml, 1/4/8 concurrent quarter-GPU trials on it, a short PTQ + QAT sweep;
# inside 9.3 minutes in all. How to carry it to the lent machine: docs/lab/2026-12-03e-results-history.md, section 4.
#   bash bench/gpu.sh OUT_DIR [--tiny] [--train-minutes M] [--work DIR]   (DATA=path/to/cifar10 to override the data)
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
    for p in "${parts[@]}"; do  # a part carried in an earlier call (still there while warm) is not unpacked twice
        mark="$site/.unpacked-$(basename "$p")-$(stat -c %s "$p")"
        if [ -e "$mark" ]; then echo "already unpacked $p"; continue; fi
        tar -xJf "$p" -C "$site" && touch "$mark" && echo "unpacked $p"
    done
    exit 0
fi
out="${1:?usage: bench/gpu.sh OUT_DIR [--tiny] [--train-minutes M]}"
shift
# The project's .venv where there is one (a developer's machine: it has every package), else PY or the
# machine's python3 with the unpacked bundle in front of its own packages (the lent GPU machine)
if [ -z "${PY:-}" ] && [ -x "$here/../.venv/bin/python" ]; then
    PY="$here/../.venv/bin/python"
else
    PY="${PY:-$(command -v python3)}"
    [ -d "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
args=(--out "$out")
[ -n "${DATA:-}" ] && args+=(--data "$DATA")
mkdir -p "$out"
set -o pipefail
"$PY" "$here/gpu_bench.py" "${args[@]}" "$@" 2>&1 | tee "$out/gpu_bench.log"  # the log comes back with the JSON
