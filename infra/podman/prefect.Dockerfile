# Prefect's server, a stand-in for the published prefecthq/prefect image in
# infra/podman/compose.local.yaml (no registry reachable): the same Prefect version as the
# worker's (constraints.txt), asyncpg for PostgreSQL. Build from the repository root.
ARG BASE_IMAGE=localhost/vae-pipeline-base:bookworm
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /tmp/constraints.txt prefect asyncpg
EXPOSE 4200
CMD ["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"]
