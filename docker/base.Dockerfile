# The dependency image for hosts without an image registry (`make images`): Debian bookworm made locally
# with debootstrap, Python 3.11, and every pinned package installed from a wheelhouse that `make images`
# gathers with the host's pip (build/docker/wheels: the same torch wheel as the host's install), with no
# index. The application image (Dockerfile) builds on it with --build-arg BASE=<this image>.
ARG DEBIAN=local/debian:bookworm
FROM ${DEBIAN} AS os
# g++ and the Python headers: torch.compile (inductor) builds its CPU kernels with them
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ curl \
        ca-certificates procps && rm -rf /var/lib/apt/lists/*

FROM os AS wheels
COPY wheels /wheels
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        -r /wheels/requirements.txt

# the wheelhouse stays in the build stage: the image holds the installed packages only
FROM os
COPY --from=wheels /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
