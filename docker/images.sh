#!/usr/bin/env bash
# `make images`: the images docker-compose.yml runs, each tagged by the content it is built from, so that
# an unchanged input is never rebuilt. Prints the tags as BITSEARCH_IMAGE=... and POSTGRES_IMAGE=... lines
# (also written to build/docker/images.env).
#
# With an image registry (docker pull python:3.11-slim works): the app image on python:3.11-slim with
# packages from PyPI, Postgres the official postgres:16.
# Without one: a Debian bookworm base made here (debootstrap, root), every pinned wheel gathered by the
# host's pip (build/docker/wheels: the same torch wheel as the host's install) and installed with no index
# (docker/base.Dockerfile), Postgres 15 from Debian's package (docker/postgres.Dockerfile).
# BITSEARCH_REGISTRY=0 / 1 forces either path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=build/docker
mkdir -p "$WORK"
say() { echo "images: $*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
digest() { sha256sum | cut -c1-12; }
# the content of files and folders (sources only: no caches), as one short hash
content() { find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | digest; }
build() {  # docker build, its output kept in a log (shown when it fails)
    docker build "$@" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; echo "images: docker build failed" >&2; exit 1; }
}

registry=${BITSEARCH_REGISTRY:-}
if [ -z "$registry" ]; then
    if timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then registry=1; else registry=0; fi
fi

if [ "$registry" = 1 ]; then
    postgres=postgres:16
    docker pull -q "$postgres" >/dev/null
    base=python:3.11-slim
else
    say "no image registry answers: building from a local Debian base"
    debian=local/debian:bookworm
    if ! have "$debian"; then
        command -v debootstrap >/dev/null || { echo "images: no registry and no debootstrap: apt-get install debootstrap" >&2; exit 1; }
        say "debootstrap bookworm (a few minutes, ~200 MB)"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 \
            || { echo "images: debootstrap failed, see $WORK/debootstrap.log" >&2; exit 1; }
        tar -C "$WORK/rootfs" -c . | docker import - "$debian" >/dev/null
        rm -rf "$WORK/rootfs"
    fi
    postgres=bitsearch-postgres:$(content docker/postgres.Dockerfile docker/postgres-entrypoint.sh)
    if ! have "$postgres"; then
        say "building $postgres"
        build -f docker/postgres.Dockerfile -t "$postgres" docker
    fi
    # the wheelhouse: what pyproject.toml pins (+ the Postgres driver and boto3 for S3 artifacts)
    "$PY" - >"$WORK/requirements.new" <<'EOF'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(deps + ["psycopg2-binary==2.9.11", "boto3==1.44.8", "setuptools>=77.0.3"]))
EOF
    base=bitsearch-base:$(cat "$WORK/requirements.new" docker/base.Dockerfile | digest)
    if ! have "$base"; then
        if ! cmp -s "$WORK/requirements.new" "$WORK/wheels/requirements.txt" 2>/dev/null; then
            say "gathering the pinned wheels with the host's pip"
            rm -rf "$WORK/wheels"
            "$PY" -m pip download -q -d "$WORK/wheels" -r "$WORK/requirements.new" 2>&1 | grep -v "^WARNING: Location" >&2 || true
            ls "$WORK"/wheels/torch-*.whl >/dev/null 2>&1 || { echo "images: pip download gathered no torch wheel" >&2; exit 1; }
            cp "$WORK/requirements.new" "$WORK/wheels/requirements.txt"
        fi
        say "building $base (installs every pinned package, ~10 minutes)"
        build -f docker/base.Dockerfile -t "$base" "$WORK"
    fi
fi

app=bitsearch:$( { echo "$base"; content Dockerfile pyproject.toml README.md bitsearch trainer quantization pipeline tune \
    mlflow_server configs; } | digest)
if ! have "$app"; then
    say "building $app on $base"
    build --build-arg BASE="$base" -t "$app" .
fi
docker tag "$app" bitsearch:latest
printf 'BITSEARCH_IMAGE=%s\nPOSTGRES_IMAGE=%s\n' "$app" "$postgres" | tee "$WORK/images.env"
