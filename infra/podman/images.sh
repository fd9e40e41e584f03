#!/usr/bin/env bash
# Build the stack's images, and local stand-ins for the published ones, with podman on a local
# Debian base (infra/podman/base-image.sh, made once, or again with --new-base), for machines
# that reach PyPI and Debian's archives but no registry. pip's cache is a build cache mount, so
# a rebuild after a code change reinstalls nothing. Run from the repository root, with
# CONTAINERS_CONF=infra/podman/containers.conf (`make images` does both). Prints each step's seconds.
set -euo pipefail
base=localhost/vae-pipeline-base:bookworm
tag=${VAE_IMAGE_TAG:-dev}
timed() {  # timed LABEL COMMAND...: run, then print "LABEL: N s"
  local label=$1 start=$SECONDS
  shift
  "$@"
  echo "$label: $((SECONDS - start)) s"
}
if [ "${1:-}" = --new-base ] || ! podman image exists "$base"; then
  timed "base image ($base, mmdebstrap + podman import)" infra/podman/base-image.sh "$base"
fi
# the project's images (infra/docker), then the stand-ins for published images that
# infra/podman/compose.local.yaml runs in their place
for dockerfile in infra/docker/mlflow.Dockerfile infra/docker/worker.Dockerfile \
  infra/podman/postgres.Dockerfile infra/podman/prefect.Dockerfile infra/podman/s3.Dockerfile; do
  image=localhost/vae-pipeline-$(basename "$dockerfile" .Dockerfile):$tag
  timed "$image" podman build --quiet --file "$dockerfile" --build-arg "BASE_IMAGE=$base" \
    --tag "$image" .
done
