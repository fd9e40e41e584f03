"""The champion's pinned test data: the test split of the data version it was tested on.

A retrain on new data (a drift retrain on a landing folder, another `--source`) is evaluated
on the new data's own test split, which may be small and from another domain. The gate judges
such a candidate on the champion's test data too: that data version is rebuilt here from DVC
(the cache, else the remote) and prepared with the champion's own data settings (its recorded
lineage), under `data/prepared-pinned-<version>/` (a folder that ignores itself in git), once.

The DVC pointer used to check the version out lives only while `dvc pull` runs, in a folder of
its own at the project's root: DVC refuses a pointer inside an ignored folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from vae_pipeline import versioning
from vae_pipeline.config import Config, build_config
from vae_pipeline.data.dataset import read_manifest
from vae_pipeline.data.preparation import prepare
from vae_pipeline.errors import UserError
from vae_pipeline.lineage import PARAMS_FILE, download_lineage

log = logging.getLogger(__name__)

PINNED_PREFIX = "data/prepared-pinned-"


def tested_on(mv) -> str | None:
    """The data version a registered version was tested on (None when unversioned)."""
    version = (mv.tags or {}).get("test_data_version")
    return None if version in (None, "", "None", "unversioned") else version


def prepared_version(prepared: Path) -> str | None:
    """The data version of a prepared folder (None when there is none)."""
    if not (Path(prepared) / "manifest.json").is_file():
        return None
    return read_manifest(prepared).get("data_version")


def pinned_config(cfg: Config, client: MlflowClient, mv, workdir: Path) -> Config | None:
    """A config whose data.prepared_dir holds the test split `mv` was tested on, rebuilt when
    this workspace's prepared data is another version; None when the workspace's is that
    version already (or `mv` names none)."""
    wanted = tested_on(mv)
    if wanted is None or prepared_version(workdir / cfg.data.prepared_dir) == wanted:
        return None
    folder = f"{PINNED_PREFIX}{wanted}"
    data = {**_champion_data(client, mv, cfg), "raw_dir": f"{folder}/raw"}
    data["prepared_dir"] = f"{folder}/prepared"
    pinned = cfg.model_copy(update={"data": cfg.data.model_copy(update=data)})
    if prepared_version(workdir / pinned.data.prepared_dir) != wanted:
        log.info("gate: rebuilding v%s's test data (data version %s)", mv.version, wanted)
        _check_out(workdir, wanted, workdir / pinned.data.raw_dir)
        prepare(pinned, workdir, data_version=wanted)
        (workdir / folder / ".gitignore").write_text("*\n")  # a rebuilt copy, never committed
    return pinned


def _champion_data(client: MlflowClient, mv, cfg: Config) -> dict:
    """The data settings `mv` was prepared with (its recorded lineage), else this config's."""
    folder = download_lineage(client, mv.run_id)
    if folder is None or not (folder / PARAMS_FILE).is_file():
        log.info("gate: v%s recorded no params; preparing its data with this config's", mv.version)
        return cfg.data.model_dump()
    recorded = yaml.safe_load((folder / PARAMS_FILE).read_text()) or {}
    recorded["registry"] = cfg.registry.model_dump()  # a redacted URI does not validate
    return build_config(recorded, origin=f"v{mv.version}'s lineage").data.model_dump()


def _check_out(workdir: Path, version: str, raw: Path) -> None:
    """The raw snapshot of data version `version` into `raw` (from DVC's cache or remote)."""
    staging = workdir / f".vae-pinned-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    outs = {"outs": [{"md5": f"{version}.dir", "hash": "md5", "path": "raw"}]}
    (staging / "raw.dvc").write_text(yaml.safe_dump(outs, sort_keys=False))
    try:
        versioning.dvc(["pull", f"{staging.name}/raw.dvc"], workdir)
        shutil.rmtree(raw, ignore_errors=True)
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging / "raw", raw)
    except versioning.VersioningError as exc:
        raise UserError(
            f"the champion's test data (data version {version}) is neither in DVC's cache nor "
            f"in its remote here, so a candidate cannot be judged on it: configure the remote "
            f"that holds it (`vae-pipeline lineage` names it) and retry. {exc}"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
