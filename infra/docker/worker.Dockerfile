# The GPU worker of infra/compose.yaml and infra/k8s/: the project installed with CUDA-enabled
# torch, running a Prefect worker (compose) or a flow run / torchrun rank (Kubernetes).
# PyPI's Linux torch wheels bundle the CUDA runtime, so the host needs only the NVIDIA driver
# and the container toolkit. Build from the repository root:
#   docker build -f infra/docker/worker.Dockerfile -t vae-pipeline-worker .
# BASE_IMAGE: any Debian bookworm image with python and pip on PATH; `make images` builds one
# with mmdebstrap where no registry is reachable (infra/README.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# git: DVC; dataset-fashion-mnist: the default data source (data.fashion_mnist_dir);
# tini: PID 1 that forwards signals and reaps torchrun's ranks.
# Not version-pinned: bookworm's security updates replace old versions in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git dataset-fashion-mnist tini \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    DVC_NO_ANALYTICS=1 \
    AWS_EC2_METADATA_DISABLED=true \
    PREFECT_HOME=/var/lib/vae-pipeline/.prefect

WORKDIR /srv/vae-pipeline
# Dependencies first (pinned by constraints.txt), so code changes reuse this layer; pip's cache
# is a build cache mount, kept between builds and never in the image.
COPY pyproject.toml constraints.txt README.md ./
COPY vae_pipeline/__init__.py vae_pipeline/__init__.py
COPY flows/__init__.py flows/__init__.py
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt . \
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
