#!/usr/bin/env bash
# A Debian bookworm base image with python and pip on PATH (like python:3.11-slim-bookworm),
# made from Debian's packages with mmdebstrap and imported into podman (python on PATH in login
# shells too: /etc/profile.d), for machines that reach Debian's and PyPI's archives but no
# container registry. The host's extra CA certificates
# (/usr/local/share/ca-certificates: a TLS-inspecting proxy's, say) are trusted in it, by the
# system and by pip. Usage: infra/podman/base-image.sh [TAG]
set -euo pipefail
tag=${1:-localhost/vae-pipeline-base:bookworm}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  --customize-hook='for c in /usr/local/share/ca-certificates/*.crt; do
      if [ -e "$c" ]; then cp "$c" "$1/usr/local/share/ca-certificates/"; fi; done
    chroot "$1" update-ca-certificates >/dev/null' \
  --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"' \
  --customize-hook='chroot "$1" python3 -m venv /opt/python' \
  --customize-hook='printf "PATH=/opt/python/bin:\$PATH\nexport PATH\n" > "$1/etc/profile.d/python-venv.sh"' \
  bookworm "$work/rootfs.tar"
podman import \
  --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$work/rootfs.tar" "$tag" >/dev/null
echo "$tag"
