# The GPU worker of infra/compose.yaml and infra/k8s/: the project installed with CUDA-enabled
# torch, running a Prefect worker (compose) or a flow run / torchrun rank (Kubernetes).
# PyPI's Linux torch wheels bundle the CUDA runtime, so the host needs only the NVIDIA driver
# and the container toolkit. Build from the repository root:
#   docker build -f infra/docker/worker.Dockerfile -t vae-pipeline-worker .
FROM python:3.11-slim-bookworm

# git: DVC; dataset-fashion-mnist: the default data source (data.fashion_mnist_dir);
# tini: PID 1 that forwards signals and reaps torchrun's ranks.
# Not version-pinned: bookworm's security updates replace old versions in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git dataset-fashion-mnist tini \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    DVC_NO_ANALYTICS=1 \
    AWS_EC2_METADATA_DISABLED=true \
    PREFECT_HOME=/var/lib/vae-pipeline/.prefect

WORKDIR /srv/vae-pipeline
# Dependencies first (pinned by constraints.txt), so code changes reuse this layer.
COPY pyproject.toml constraints.txt README.md ./
COPY vae_pipeline/__init__.py vae_pipeline/__init__.py
COPY flows/__init__.py flows/__init__.py
RUN pip install --no-cache-dir -c constraints.txt . \
    && pip uninstall -y vae-pipeline
COPY vae_pipeline vae_pipeline
COPY flows flows
RUN pip install --no-cache-dir --no-deps -c constraints.txt .
COPY params.yaml dvc.yaml prefect.yaml ./

# Runs as a user; the flows write to the state volume, `vae-pipeline deploy` to the project folder.
RUN useradd --create-home --uid 10001 vae \
    && mkdir -p /var/lib/vae-pipeline \
    && chown -R vae /var/lib/vae-pipeline /srv/vae-pipeline
USER 10001
VOLUME ["/var/lib/vae-pipeline"]

ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "vae-pipeline", "--type", "process"]
