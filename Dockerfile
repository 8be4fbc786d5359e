# bitsearch application image: the CLI, Ray and the MLflow client and server.
#   online:   docker build -t bitsearch .          (python:3.11-slim, packages from PyPI)
#   no registry: make images                        (BASE = docker/base.Dockerfile's image, no index needed)
ARG BASE=python:3.11-slim
FROM ${BASE}
# g++: torch.compile (inductor) builds its CPU kernels with it. A BASE from docker/base.Dockerfile has it,
# and every pinned package in /opt/venv already (there torch is the host's wheel, CUDA libraries included:
# no CPU-only build of the pinned version is reachable without PyTorch's own index). Online, torch comes
# from TORCH_INDEX: PyTorch's CPU wheels by default (no CUDA libraries), .../whl/cu130 for GPU workers.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ ! -x /opt/venv/bin/python ]; then \
        apt-get update && apt-get install -y --no-install-recommends curl g++ procps && rm -rf /var/lib/apt/lists/* \
        && python3 -m venv /opt/venv \
        && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1; fi
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bitsearch bitsearch
COPY trainer trainer
COPY quantization quantization
COPY pipeline pipeline
COPY tune tune
COPY mlflow_server mlflow_server
COPY configs configs
RUN pip install --no-cache-dir --no-build-isolation . psycopg2-binary==2.9.11 boto3==1.44.8
ENTRYPOINT ["bitsearch"]
