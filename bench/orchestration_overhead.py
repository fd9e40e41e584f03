"""Orchestration overhead of the retrain flow: its wall time minus the time inside the steps'
library calls, with Prefect ephemeral (in-process server) and against a running `prefect server`.

Each mode runs in its own process on one tiny workspace (real Fashion-MNIST subset, real MLflow
SQLite store, real DVC). The library calls (vae_pipeline.pipeline's ingest, prepare_data,
train, evaluate_model, register, promote and the tracking calls) are timed from inside, so

    overhead = flow wall time - time inside those calls

is what Prefect (task runs, states, caching, the concurrency lock, artifacts) adds. The first
flow of an ephemeral process also starts the in-process server; it is reported apart.
Runs are forced (every step does its work) and then repeated with the cache (nothing to do).

    python bench/orchestration_overhead.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TIMED = [
    ("vae_pipeline.pipeline", "ingest"),
    ("vae_pipeline.pipeline", "prepare_data"),
    ("vae_pipeline.pipeline", "train"),
    ("vae_pipeline.pipeline", "evaluate_model"),
    ("vae_pipeline.pipeline", "register"),
    ("vae_pipeline.pipeline", "promote"),
    ("vae_pipeline.tracking", "preflight"),
    ("vae_pipeline.tracking", "start_run"),
    ("vae_pipeline.tracking", "finish_run"),
    ("vae_pipeline.tracking", "reopen_run"),
    ("vae_pipeline.tracking", "ui_links"),
]
CORE = ("prepare_data", "train", "evaluate_model")


def _instrument(spent: dict[str, float]) -> None:
    """Wrap the library calls the flow makes so their time is added up in `spent`."""
    import importlib

    for module_name, name in TIMED:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)


def child(workdir: Path, runs: int) -> None:
    """One mode: `runs` forced retrains, then `runs` cached ones; prints JSON lines."""
    spent: dict[str, float] = {}
    start = time.perf_counter()
    from flows.retrain import retrain  # noqa: F401 (imports Prefect, torch, MLflow once)

    _instrument(spent)
    imports = time.perf_counter() - start
    print(json.dumps({"imports_s": imports}), flush=True)
    for i in range(2 * runs):
        spent.clear()
        force = i < runs
        start = time.perf_counter()
        retrain(workdir=str(workdir), force=force)
        wall = time.perf_counter() - start
        record = {
            "run": i,
            "forced": force,
            "wall_s": wall,
            "inside_s": sum(spent.values()),
            "core_s": sum(spent.get(k, 0.0) for k in CORE),
            "steps": spent.copy(),
        }
        print(json.dumps(record), flush=True)


def _workspace(root: Path) -> Path:
    import yaml

    from tests.conftest import make_workspace

    ws = make_workspace(root / "ws")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["nproc_per_node"] = 1
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_mode(name: str, ws: Path, runs: int, env: dict) -> list[dict]:
    print(f"--- {name}", file=sys.stderr, flush=True)
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(ws), "--runs", str(runs)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ws,
    )
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stderr[-4000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="forced (and cached) runs per mode")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.runs)
        return

    from vae_pipeline.config.environment import apply_quiet_offline_defaults

    apply_quiet_offline_defaults()
    tmp = Path(tempfile.mkdtemp(prefix="vae-orch-bench-"))
    base = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    base.pop("PREFECT_API_URL", None)
    results = {}
    ws = _workspace(tmp / "ephemeral")
    results["ephemeral"] = _run_mode(
        "ephemeral", ws, args.runs, {**base, "PREFECT_HOME": str(tmp / "home-ephemeral")}
    )

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_home = tmp / "home-server"
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env={**base, "PREFECT_HOME": str(server_home)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        import requests

        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(api + "/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                sys.exit("prefect server did not start")
            time.sleep(0.5)
        ws = _workspace(tmp / "server")
        results["server"] = _run_mode(
            "server",
            ws,
            args.runs,
            {**base, "PREFECT_HOME": str(tmp / "home-client"), "PREFECT_API_URL": api},
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    print("| mode | runs | flow wall (s) | inside the steps (s) | overhead (s) | "
          "wall - prepare/train/evaluate (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for mode, records in results.items():
        runs = [r for r in records if "run" in r]
        first = runs[0]
        print(
            f"| {mode}, first flow of the process | 1 | {first['wall_s']:.1f} | "
            f"{first['inside_s']:.1f} | {first['wall_s'] - first['inside_s']:.1f} | "
            f"{first['wall_s'] - first['core_s']:.1f} |"
        )
        for forced in (True, False):
            rows = [r for r in runs[1:] if r["forced"] == forced]
            if not rows:
                continue
            wall = _median([r["wall_s"] for r in rows])
            inside = _median([r["inside_s"] for r in rows])
            over = _median([r["wall_s"] - r["inside_s"] for r in rows])
            core = _median([r["wall_s"] - r["core_s"] for r in rows])
            label = "forced (all steps work)" if forced else "cached re-run (nothing to do)"
            print(
                f"| {mode}, {label} | {len(rows)} | {wall:.1f} | {inside:.1f} | {over:.2f} | "
                f"{core:.1f} |"
            )
    imports = ", ".join(f"{m} {r[0]['imports_s']:.1f} s" for m, r in results.items())
    print(f"\nimports (Prefect, torch, MLflow) per process: {imports}")


if __name__ == "__main__":
    main()
