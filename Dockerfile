# bitsearch application image: the CLI, Ray and the MLflow client/server.
FROM python:3.11-slim
# g++: torch.compile (inductor) builds its CPU kernels with it: the cpu profile's compiled training step
# (`compile: true`) needs it, and the quantizers' fused kernel would fall back to eager without it
RUN apt-get update && apt-get install -y --no-install-recommends curl g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bitsearch bitsearch
COPY trainer trainer
COPY quantization quantization
COPY pipeline pipeline
COPY tune tune
COPY mlflow_server mlflow_server
COPY configs configs
RUN pip install --no-cache-dir -e . psycopg2-binary==2.9.11 boto3==1.40.0
ENTRYPOINT ["bitsearch"]
