# The MLflow server of infra/compose.yaml: MLflow with the PostgreSQL driver and boto3 (artifacts
# in MinIO), versions from the project's constraints.txt. Build from the repository root.
# BASE_IMAGE: as in worker.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /tmp/constraints.txt "mlflow[auth]==3.17.2" boto3 psycopg2-binary==2.9.10 \
    && useradd --create-home --uid 10001 mlflow \
    && mkdir -p /var/lib/mlflow \
    && chown mlflow /var/lib/mlflow
USER 10001
WORKDIR /var/lib/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
