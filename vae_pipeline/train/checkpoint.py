"""Checkpoints and final model files: atomic writes, `torch.load(weights_only=True)` reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vae_pipeline.errors import UserError
from vae_pipeline.model import ConvVAE


class CheckpointError(UserError):
    """A checkpoint or model file that exists but cannot be read; the message names it."""


def _tmp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid}")


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file and rename: a crash mid-write leaves the old file intact
    (and a `.NAME.tmp-PID` file, which `remove_stale_temp_files` clears on the next start)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path, os.getpid())
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that died (their process is gone); returns them."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def load(path: Path) -> dict[str, Any]:
    """A checkpoint or model file's contents. A training checkpoint whose weights or Adam
    state hold a NaN or an infinity is refused like a damaged file: training never writes one
    (`Checkpointer.save` refuses), and a resume would only go on from those values."""
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first (vae-pipeline train)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, overwritten, not a torch file: one message for all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = f"cannot be read ({reason[:160]}): it is damaged or not a checkpoint"
        raise damaged(path, what) from None
    bad = non_finite_entries({k: state[k] for k in ("model", "optimizer") if k in state})
    if bad:
        what = f"holds non-finite values ({', '.join(bad[:3])}): a resume would go on from them"
        raise damaged(path, what)
    return state


def damaged(path: Path, what: str) -> CheckpointError:
    """The error of a checkpoint that must not be resumed from, with the ways out."""
    return CheckpointError(
        f"{path} {what}. Move it aside (mv {path} {path}.damaged) to start this training "
        "over, or put a good copy back to resume from it"
    )


def non_finite_entries(tensors: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors in `tensors` (nested dicts and lists too, as in
    an optimizer's state) that hold a NaN or an infinity."""
    bad: list[str] = []

    def walk(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{name}.{key}" if name else str(key), item)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(f"{name}[{i}]", item)

    walk("", tensors)
    return bad


def peek(path: Path, key: str) -> Any:
    """One entry of a checkpoint without reading its tensors (memory-mapped), or None when
    the file cannot be read (the full load later says why)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)
    except Exception:  # a truncated or foreign file: not this function's to report
        return None


def save_model(model: ConvVAE, path: Path, **metadata: Any) -> None:
    """The final model: constructor arguments + weights + lineage metadata (plain values).
    Refuses non-finite weights: such a model must never reach evaluation or the registry."""
    bad = [name for name, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}; "
            "the previous file, if any, is left as it was"
        )
    atomic_save({"hparams": model.hparams(), "state_dict": model.state_dict(), **metadata}, path)


def load_model(path: Path) -> tuple[ConvVAE, dict[str, Any]]:
    blob = load(path)
    model = ConvVAE(**blob["hparams"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    meta = {k: v for k, v in blob.items() if k not in ("state_dict",)}
    return model, meta
