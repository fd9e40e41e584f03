#!/usr/bin/env bash
# The compose stack under podman (infra/compose.yaml + infra/podman/compose.local.yaml), timed:
# `up` on empty volumes until MLflow and Prefect answer and the worker has created the
# deployments; `down`; `up` again on the kept volumes; then everything removed. Fresh random
# passwords and free ports; images from `make images` (VAE_IMAGE_TAG, default dev). Run as root
# from the repository root, after `make install images`, on an otherwise idle machine.
#   bash bench/stack_startup.sh
set -euo pipefail
export CONTAINERS_CONF=$PWD/infra/podman/containers.conf
tag=${VAE_IMAGE_TAG:-dev}
project=vae-bench-$$
env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { .venv/bin/python -c 'import secrets; print(secrets.token_hex(12))'; }
mlflow_port=$(port) prefect_port=$(port) pf_secret=$(secret)
cat > "$env_file" <<ENV
POSTGRES_USER=vae
POSTGRES_PASSWORD=$(secret)
MINIO_ROOT_USER=vae-pipeline
MINIO_ROOT_PASSWORD=$(secret)
S3_BUCKET=vae-pipeline
MLFLOW_ADMIN_USERNAME=admin
MLFLOW_ADMIN_PASSWORD=$(secret)
MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret)
PREFECT_AUTH_STRING=admin:$pf_secret
VAE_PIPELINE_DEPLOY_ARGS=
VAE_IMAGE_TAG=$tag
MLFLOW_PORT=$mlflow_port
PREFECT_PORT=$prefect_port
S3_PORT=$(port)
S3_CONSOLE_PORT=$(port)
ENV
compose() {
  .venv/bin/podman-compose --env-file "$env_file" -p "$project" \
    -f infra/compose.yaml -f infra/podman/compose.local.yaml "$@" >/dev/null 2>&1
}
ready() {  # seconds until MLflow's /health, Prefect's /api/health and both deployments answer
  local start=$1
  until curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null \
    && curl -sf -u "admin:$pf_secret" -X POST -H 'content-type: application/json' -d '{}' \
      "http://127.0.0.1:$prefect_port/api/deployments/filter" | grep -q '"name":"monitor"' \
    && curl -sf -u "admin:$pf_secret" -X POST -H 'content-type: application/json' -d '{}' \
      "http://127.0.0.1:$prefect_port/api/deployments/filter" | grep -q '"name":"retrain"'; do
    if [ $((SECONDS - start)) -gt 600 ]; then echo "not ready after 600 s" >&2; exit 1; fi
    sleep 1
  done
  echo $((SECONDS - start))
}
echo "# $(date -u +%F), $(uname -m), $(nproc) cores: bash bench/stack_startup.sh (images :$tag)"
start=$SECONDS; compose up -d --no-deps
echo "up, empty volumes, until the deployments exist: $(ready $start) s"
start=$SECONDS; compose down
echo "down (S3 objects saved to their volume): $((SECONDS - start)) s"
start=$SECONDS; compose up -d --no-deps
echo "up again, kept volumes, until the deployments exist: $(ready $start) s"
compose down -v
