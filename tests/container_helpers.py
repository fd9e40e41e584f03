"""podman for the container tests: the command with the project's settings, and the stack's
images (infra/podman/images.sh, tag `test`; built once per session by conftest's `images`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONF = REPO / "infra" / "podman" / "containers.conf"
TAG = "test"
IMAGES = [
    f"localhost/vae-pipeline-{name}:{TAG}"
    for name in ("mlflow", "worker", "postgres", "prefect", "s3")
]


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONF)}


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr[-3000:]}")
    return result


def build_images() -> list[str]:
    """The stack's images, built (or brought up to date: layers and pip's cache are kept)."""
    result = subprocess.run(
        [str(REPO / "infra/podman/images.sh")],
        cwd=REPO,
        env={**podman_env(), "VAE_IMAGE_TAG": TAG},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return IMAGES
