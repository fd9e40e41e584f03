#!/usr/bin/env bash
# The stack's images built with podman on the local Debian base, timed: from nothing (no
# images, no pip cache: --cold), then again with nothing changed (layers reused). Run as root
# from the repository root on an otherwise idle machine; prints the seconds of each step.
#   bash bench/image_builds.sh --cold
set -euo pipefail
export CONTAINERS_CONF=$PWD/infra/podman/containers.conf VAE_IMAGE_TAG=bench
if [ "${1:-}" = --cold ]; then
  for image in worker mlflow postgres prefect s3; do
    podman rmi --force "localhost/vae-pipeline-$image:bench" >/dev/null 2>&1 || true
  done
  podman rmi --force localhost/vae-pipeline-base:bookworm >/dev/null 2>&1 || true
  podman image prune --force >/dev/null
  rm -rf /var/tmp/buildah-cache /var/tmp/buildah-cache-*  # build cache mounts: pip's downloads
fi
echo "# $(date -u +%F), $(uname -m), $(nproc) cores: bash bench/image_builds.sh ${1:-}"
echo "## first build"
infra/podman/images.sh
echo "## again, nothing changed"
infra/podman/images.sh
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'vae-pipeline-(base|mlflow|worker|postgres|prefect|s3)' | grep -E 'bench|bookworm'
