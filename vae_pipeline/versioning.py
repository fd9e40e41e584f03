"""Data versioning with DVC (local folder remote by default, S3 by `data.remote: s3`) and git lineage.

The data version is the DVC hash of the raw snapshot (`outs[0].md5` in `<raw_dir>.dvc`):
the same content gives the same version and stores nothing new.
S3 settings go to `.dvc/config.local` (git-ignored); credentials are never written anywhere:
DVC reads them from the standard AWS environment/profile chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import yaml

from vae_pipeline.config import Config
from vae_pipeline.config.environment import s3_endpoint_url
from vae_pipeline.errors import TransientError

log = logging.getLogger(__name__)

LOCAL_REMOTE = "local"
S3_REMOTE = "s3"


class VersioningError(TransientError):
    """A DVC or git operation failed; the message carries DVC's own explanation. Retried by
    the flow: a push to a remote that did not answer may go through next time."""


def dvc(args: list[str], workdir: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise VersioningError(
            f"`dvc {' '.join(args)}` failed in {workdir}:\n{(result.stderr or result.stdout).strip()}"
        )
    return result


def ensure_repo(workdir: Path) -> None:
    """Make `workdir` a DVC repo with the default local remote, if it is not one yet."""
    if not (workdir / ".dvc").is_dir():
        scm = [] if (workdir / ".git").exists() else ["--no-scm"]
        dvc(["init", *scm], workdir)
        log.info("initialised a DVC repo in %s", workdir)
    remotes = dvc(["remote", "list"], workdir).stdout
    if not any(line.split()[:1] == [LOCAL_REMOTE] for line in remotes.splitlines()):
        dvc(
            ["remote", "add", "-d", LOCAL_REMOTE, str((workdir / ".dvc-storage").resolve())],
            workdir,
        )


def local_remote_url(workdir: Path) -> str | None:
    """The `local` remote's folder as DVC resolves it (absolute), or None without one."""
    url = dvc(["config", f"remote.{LOCAL_REMOTE}.url"], workdir, check=False).stdout.strip()
    return url or None


def configure_s3_remote(cfg: Config, workdir: Path) -> str:
    if not cfg.data.s3_url:
        raise VersioningError("data.remote=s3 needs data.s3_url (s3://bucket/prefix)")
    dvc(["remote", "add", "--local", "-f", S3_REMOTE, cfg.data.s3_url], workdir)
    endpoint = s3_endpoint_url()
    if endpoint:
        dvc(["remote", "modify", "--local", S3_REMOTE, "endpointurl", endpoint], workdir)
    return S3_REMOTE


def pointer_file(cfg: Config, workdir: Path) -> Path:
    return workdir / f"{cfg.data.raw_dir.rstrip('/')}.dvc"


def read_data_version(cfg: Config, workdir: Path = Path(".")) -> str | None:
    """The DVC hash of the raw snapshot, from its .dvc file; None if it was never versioned."""
    path = pointer_file(cfg, workdir)
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    md5 = outs[0].get("md5")
    return md5.removesuffix(".dir") if md5 else None


def _push(remote: str, pointer: str, workdir: Path, attempts: int) -> None:
    """`dvc push`, retried with backoff: it only uploads objects the remote lacks, so a retry
    after a transient failure resumes where the last attempt stopped."""
    for attempt in range(1, attempts + 1):
        try:
            dvc(["push", "-q", "-r", remote, pointer], workdir)
            return
        except VersioningError as exc:
            if attempt == attempts:
                raise
            wait = 2.0**attempt
            log.warning(
                "push attempt %d/%d failed, retrying in %.0f s: %s", attempt, attempts, wait, exc
            )
            time.sleep(wait)


def version_data(cfg: Config, workdir: Path = Path("."), push: bool = True) -> str:
    """`dvc add` the raw snapshot, push it to the configured remote; returns the data version.

    A version is recorded (the `.dvc` pointer file) only once its objects are in the remote: if
    the push fails after `data.push_attempts` tries, the pointer and the raw area go back to the
    previous version and the error says so.
    """
    ensure_repo(workdir)
    pointer = pointer_file(cfg, workdir)
    previous = pointer.read_bytes() if pointer.is_file() else None
    previous_version = read_data_version(cfg, workdir)
    try:
        dvc(["add", cfg.data.raw_dir], workdir)
        version = read_data_version(cfg, workdir)
        if version is None:
            raise VersioningError(f"dvc add wrote no hash to {pointer}")
    except BaseException:
        # `dvc add` failed or was stopped part-way: the raw area and its pointer go back to
        # the recorded version together, so they never disagree
        _restore_pointer(pointer, previous, cfg, workdir)
        raise
    if push:
        remote = configure_s3_remote(cfg, workdir) if cfg.data.remote == "s3" else LOCAL_REMOTE
        rel = str(pointer.relative_to(workdir))
        try:
            _push(remote, rel, workdir, cfg.data.push_attempts)
        except VersioningError as exc:
            if version == previous_version:  # nothing new to record; the remote lags behind
                raise VersioningError(
                    f"pushing data version {version} (unchanged) to DVC remote {remote!r} failed "
                    f"{cfg.data.push_attempts} times; run `vae-pipeline ingest` again. {exc}"
                ) from exc
            _restore_pointer(pointer, previous, cfg, workdir)
            kept = f"still {previous_version}" if previous_version else "not versioned yet"
            raise VersioningError(
                f"data version {version} was not recorded: pushing it to DVC remote {remote!r} "
                f"failed {cfg.data.push_attempts} times. {rel} is {kept}; objects already "
                f"uploaded are reused when you run `vae-pipeline ingest` again. {exc}"
            ) from exc
        log.info("data version %s pushed to DVC remote %r", version, remote)
    return version


def _restore_pointer(pointer: Path, previous: bytes | None, cfg: Config, workdir: Path) -> None:
    """The pointer back to `previous` and the raw area back to that version (from DVC's
    cache); with no previous version, the pointer is removed (the new snapshot stays,
    unversioned: nothing claims it is a version)."""
    if previous is None:
        pointer.unlink(missing_ok=True)
        return
    pointer.write_bytes(previous)
    # the raw area back to the recorded version, from the local cache
    result = dvc(
        ["checkout", "-q", "--force", str(pointer.relative_to(workdir))], workdir, check=False
    )
    if result.returncode != 0:
        log.warning("could not restore %s: %s", cfg.data.raw_dir, result.stderr.strip())


def git_commit(workdir: Path = Path(".")) -> str:
    """HEAD's commit, with `-dirty` when tracked files changed; "unknown" outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=workdir,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def code_version(*extra: Path) -> str:
    """Hash of the vae_pipeline sources and of the `extra` folders (every .py file, by path
    and content): the code part of a retrain's identity, committed or not."""
    import vae_pipeline

    digest = hashlib.sha256()
    for root in (Path(vae_pipeline.__file__).parent, *extra):
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{root.name}/{path.relative_to(root)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def retrain_key(cfg: Config, data_version: str, workdir: Path, code: str) -> str:
    """What makes two retrains the same work: the workdir, the data version, the training
    params (data/model/train/evaluate sections) and the code. Same key, same model."""
    blob = "\0".join((str(workdir.resolve()), data_version, cfg.training_hash(), code))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare_key(cfg: Config, data_version: str, workdir: Path, code: str) -> str:
    """Like retrain_key, for the prepared data alone: the data section decides it."""
    data = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    blob = "\0".join((str(workdir.resolve()), data_version, data, code))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
