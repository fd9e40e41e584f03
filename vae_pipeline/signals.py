"""Processes that die with their parent, and SIGTERM handled like Ctrl-C (no torch import:
the CLI installs this before it knows which command runs).

`python -m vae_pipeline.signals PROGRAM ARGS...` runs PROGRAM so that it dies with the process
that started it: it sets PR_SET_PDEATHSIG in itself, a fresh single-threaded interpreter, and
replaces itself with PROGRAM (the setting survives exec). The launcher starts torchrun this
way rather than through a Popen `preexec_fn`, which is not safe in a process with threads
(a Prefect flow has several).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (PR_SET_PDEATHSIG), so a
    launcher killed by SIGKILL leaves no child training on. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def exit_on_sigterm() -> None:
    """Handle SIGTERM like Ctrl-C (KeyboardInterrupt), so the cleanup that an interrupt runs
    (stopping torchrun and its ranks, shutting down a Prefect server this process started)
    also runs when a scheduler or `kill` stops the process."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it outright
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def with_parent(cmd: list[str]) -> list[str]:
    """`cmd`, run so that it dies with the process that starts it (see the module doc)."""
    return [sys.executable, "-m", "vae_pipeline.signals", *cmd]


if __name__ == "__main__":
    die_with_parent()
    os.execv(sys.argv[1], sys.argv[1:])
