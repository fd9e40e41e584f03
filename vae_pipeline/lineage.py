"""A registered version's lineage: what is recorded with it, and the commands that rebuild it.

At registration (`record`) the version's MLflow run gets `lineage/`:
  params.yaml   the run's whole config, `--set` overrides included (credentials redacted);
  pointer.dvc   the DVC pointer (`data/raw.dvc`) of the data its weights were trained on;
  remote.json   the DVC remote that holds that data, the pointer's path in the repo, and
                whether another clone can reach the remote;
and the version gets the tags `code_version` (hash of the vae_pipeline sources) and
`data_remote`. The data pointer is pinned in MLflow, not in git: the flow never commits into
the user's branch, and the recorded `git_commit` plus `vae-pipeline lineage V --restore` (which
writes params.yaml and the pointer back from the run) pin code, params and data together.

`reproduce` lists the commands; run in a fresh clone that reaches the same MLflow store and
DVC remote, they rebuild the version's weights bit for bit on the same kind of device.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from vae_pipeline import versioning
from vae_pipeline.config import Config
from vae_pipeline.config.environment import s3_endpoint_url
from vae_pipeline.errors import UserError
from vae_pipeline.registry.versions import model_version
from vae_pipeline.tracking import redact

log = logging.getLogger(__name__)

LINEAGE_DIR = "lineage"
PARAMS_FILE = "params.yaml"
POINTER_FILE = "pointer.dvc"
REMOTE_FILE = "remote.json"


class LineageError(UserError):
    """A version's lineage cannot be restored (none recorded, or it does not fit this clone)."""


def remote_info(cfg: Config, workdir: Path) -> dict:
    """The DVC remote data versions are pushed to: its name, URL (credentials never included),
    the S3 endpoint when set, and whether other clones can reach it (`shared`)."""
    if cfg.data.remote == "s3":
        return {
            "name": versioning.S3_REMOTE,
            "url": redact(cfg.data.s3_url or ""),
            "endpoint": redact(s3_endpoint_url() or ""),
            "shared": True,
        }
    url = versioning.local_remote_url(workdir)
    inside = url is not None and Path(url).is_relative_to(workdir.resolve())
    return {"name": versioning.LOCAL_REMOTE, "url": url or "", "endpoint": "", "shared": not inside}


def unshared_note(remote: dict) -> str:
    return (
        f"DVC remote {remote['name']!r} is {remote['url']}, a folder inside this clone: other "
        "clones and machines cannot pull its data versions; for a team, set data.remote=s3 "
        "(data.s3_url) or `dvc remote modify local url <a shared folder>` and commit .dvc/config"
    )


def data_object_url(remote: dict, data_version: str, raw: Path) -> str:
    """Where DVC keeps a data version in the remote: the directory manifest of the raw
    snapshot (DVC 3 layout, `files/md5/<2>/<30>.dir`); without a remote, the raw snapshot
    folder itself (as a file:// URI)."""
    if not remote["url"]:
        return raw.resolve().as_uri()
    base = remote["url"].rstrip("/")
    url = f"{base}/files/md5/{data_version[:2]}/{data_version[2:]}.dir"
    return url if "://" in url else Path(url).resolve().as_uri()


def dataset_ref(split: str, data_version: str) -> tuple[str, str]:
    """A split's MLflow dataset input: (name, digest), as metrics computed on it name it."""
    return f"vae-data-{split}", data_version[:36]


def log_datasets(
    client: MlflowClient,
    run_id: str,
    remote: dict,
    raw: Path,
    data_version: str,
    test_data_version: str,
) -> None:
    """The train/val/test splits as MLflow dataset inputs of the run: source = the data
    version's object in the DVC remote, digest = the data version."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split, version in (
        ("train", data_version),
        ("val", data_version),
        ("test", test_data_version),
    ):
        with warnings.catch_warnings():  # MLflow registers the local source twice
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(data_object_url(remote, version, raw))
        name, digest = dataset_ref(split, version)
        dataset = MetaDataset(source, name=name, digest=digest)
        tags = [InputTag("mlflow.data.context", split)]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    client.log_inputs(run_id, datasets=inputs)


def record(
    cfg: Config,
    uri: str,
    run_id: str,
    workdir: Path,
    data_version: str,
    test_data_version: str | None = None,
) -> dict[str, str]:
    """Log the run's params, its data pointer and remote as `lineage/` artifacts and its splits
    as dataset inputs; returns the version tags that go with them."""
    remote = remote_info(cfg, workdir)
    pointer = versioning.pointer_file(cfg, workdir)
    recorded = versioning.read_data_version(cfg, workdir)
    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / LINEAGE_DIR
        folder.mkdir()
        params = cfg.model_dump(mode="json")
        params["registry"]["tracking_uri"] = redact(params["registry"]["tracking_uri"])
        (folder / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False))
        data = "recorded"
        if recorded == data_version:
            (folder / POINTER_FILE).write_bytes(pointer.read_bytes())
        else:  # a registration after the pointer moved on: the trained-on version is not here
            data = f"not recorded: {pointer.name} holds {recorded}, the weights {data_version}"
            log.warning("lineage of run %s: data pointer %s", run_id, data)
        try:
            rel = pointer.resolve().relative_to(workdir.resolve()).as_posix()
        except ValueError:  # data.raw_dir outside the project
            rel = str(pointer.resolve())
        (folder / REMOTE_FILE).write_text(json.dumps({**remote, "pointer": rel}, indent=2))
        client.log_artifacts(run_id, str(folder), artifact_path=LINEAGE_DIR)
    raw = workdir / cfg.data.raw_dir
    log_datasets(client, run_id, remote, raw, data_version, test_data_version or data_version)
    return {
        "code_version": versioning.code_version(),
        "data_remote": f"{remote['name']} {remote['url']}".strip(),
        "lineage_data": data,
    }


def download_lineage(client: MlflowClient, run_id: str) -> Path | None:
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=LINEAGE_DIR,
                dst_path=tempfile.mkdtemp(prefix="vae-lineage-"),
                tracking_uri=client._tracking_client.tracking_uri,
            )
        )
    except Exception:  # a version registered before lineage was recorded
        return None


def version_lineage(client: MlflowClient, name: str, version: str) -> dict:
    """A version's lineage tags, aliases and the commands that reproduce it."""
    mv = model_version(client, name, version)
    tags = dict(mv.tags or {})
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": list(mv.aliases or []),
        "run_id": mv.run_id,
        "source": mv.source,
        "tags": tags,
        "reproduce": reproduce(client, name, str(mv.version), tags, mv.run_id),
    }


def reproduce(client: MlflowClient, name: str, version: str, tags: dict, run_id: str) -> list[str]:
    """The commands that rebuild the version in a fresh clone of the project."""
    folder = download_lineage(client, run_id)
    remote = json.loads((folder / REMOTE_FILE).read_text()) if folder else None
    pointer = folder is not None and (folder / POINTER_FILE).is_file()
    store = client._tracking_client.tracking_uri
    return reproduce_commands(version, run_id, tags, remote, pointer, store)


LINEAGE_REMOTE = "lineage"  # the name a second clone gives another clone's own remote


def local_store(uri: str) -> str | None:
    """An MLflow tracking URI that is a file of this machine (SQLite, a folder), made absolute;
    None for a server every machine can reach."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return uri if path.startswith("/") else "sqlite:///" + str(Path(path).resolve())
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).resolve().as_uri()
    if "://" not in uri and ("/" in uri or Path(uri).exists()):  # a plain folder path
        return Path(uri).resolve().as_uri()
    return None  # a server, or a named one ("databricks")


def reproduce_commands(
    version: str,
    run_id: str,
    tags: dict,
    remote: dict | None,
    pointer_recorded: bool,
    store: str,
) -> list[str]:
    """The commands, runnable as printed: where the MLflow store or the DVC remote is a file of
    this machine (the defaults), they name it by its absolute location, so a fresh clone on this
    machine reaches the same store and data; other machines need a shared store and remote."""
    commit = tags.get("git_commit", "unknown")
    if commit == "unknown":
        lines = ["# no git commit was recorded: check out the code by other means"]
    else:
        lines = [f"git checkout {commit.removesuffix('-dirty')}"]
        if commit.endswith("-dirty"):
            lines.append("# trained with uncommitted changes: the checkout may differ")
    data = tags.get("data_version", "?")
    if remote is None or not pointer_recorded:
        why = (
            "registered before lineage was recorded"
            if remote is None
            else tags.get("lineage_data", "no data pointer recorded")
        )
        return lines + [
            f"# {why}: params and data pointer are the commit's (the run's params are in MLflow)",
            f"dvc pull            # data version {data}",
            "dvc repro           # prepare -> train -> evaluate with that commit's params.yaml",
        ]
    pointer = remote["pointer"]
    restore = f"vae-pipeline lineage {version} --restore"
    local = local_store(store)
    if local is not None:
        lines.append(
            "# the MLflow store is a file on this machine: named here by its path; other "
            "machines need a shared tracking server (registry.tracking_uri)"
        )
        restore += f" --set registry.tracking_uri={shlex.quote(local)}"
    lines.append(
        f"{restore}   # params.yaml and {pointer} as run {run_id} had them (overrides included)"
    )
    name = remote["name"]
    if name == versioning.S3_REMOTE:
        lines.append(f"dvc remote add --local -f {name} {remote['url']}")
        if remote.get("endpoint"):
            lines.append(f"dvc remote modify --local {name} endpointurl {remote['endpoint']}")
    elif not remote["shared"]:
        # the remote is a folder of the clone that trained it: name it by its absolute path
        # under a name of its own (this clone's `local` stays its own folder)
        lines.append(
            f"# DVC remote {name!r} is a folder inside the clone that trained it: a clone on "
            "this machine reaches it by its path, other machines cannot; for a team, set "
            "data.remote=s3 or a shared folder (docs/registry.md)"
        )
        name = LINEAGE_REMOTE
        lines.append(f"dvc remote add --local -f {name} {shlex.quote(remote['url'])}")
    lines += [
        f"dvc pull -r {name} {pointer}   # data version {data} from {remote['url']}",
        "dvc repro           # prepare -> train -> evaluate: the same weights on the same device kind",
    ]
    return lines


def restore(
    client: MlflowClient, name: str, version: str, workdir: Path, params: Path
) -> list[str]:
    """Write the version's params file and data pointer back from its run; returns what was
    written, and a warning when this checkout's code is not the code that trained it."""
    mv = model_version(client, name, version)
    folder = download_lineage(client, mv.run_id)
    if folder is None or not (folder / POINTER_FILE).is_file():
        why = (
            "no lineage was recorded with it"
            if folder is None
            else (mv.tags or {}).get("lineage_data", "no data pointer was recorded")
        )
        raise LineageError(
            f"{name} v{version}: {why}; use the commit's params.yaml and the run's params in "
            f"MLflow (run {mv.run_id})"
        )
    remote = json.loads((folder / REMOTE_FILE).read_text())
    pointer = workdir / remote["pointer"]
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_bytes((folder / POINTER_FILE).read_bytes())
    (workdir / params).write_text((folder / PARAMS_FILE).read_text())
    done = [f"wrote {params} and {remote['pointer']} of {name} v{version} (run {mv.run_id})"]
    recorded = (mv.tags or {}).get("code_version")
    if recorded and recorded != versioning.code_version():
        done.append(
            f"WARNING: this checkout's vae_pipeline code ({versioning.code_version()}) is not "
            f"the code that trained v{version} ({recorded}): check out its git_commit, without "
            "local changes"
        )
    return done
