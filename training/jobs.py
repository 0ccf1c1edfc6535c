"""Launch, cancel and resume training workers as background processes (what the dashboard uses).

A worker is exactly `python -m training run --run-id ID` (or `--resume ID`), started in its own session so it
survives page reloads, closed tabs and restarts of the app. The UI and the worker share only the run store.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from training.config import RunConfig
from training.store import RunStore

REPO = Path(__file__).resolve().parent.parent


def _spawn(store: RunStore, run_id: str, args: list[str]) -> int:
    log = open(store.run_dir(run_id) / "worker.log", "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "training", "run", *args, "--runs-dir", str(store.root)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    log.close()
    store.claim(run_id, proc.pid)
    return proc.pid


def launch(config: RunConfig, store: RunStore | None = None) -> str:
    """Register a run (queued) and start its worker in the background; returns the run id."""
    from core.models import ensure_init

    cfg = config.resolved()
    ensure_init(cfg.architecture, cfg.init)  # e.g. ImageNet weights offline: refused before anything is registered
    store = store or RunStore(cfg.runs_dir)
    run_id = store.create_run(cfg.to_dict())
    cfg.save(store.run_dir(run_id) / "config.json")
    _spawn(store, run_id, ["--run-id", run_id])
    return run_id


def resume(run_id: str, store: RunStore, epochs: int | None = None) -> int:
    """Continue a cancelled or failed run from its checkpoint in a new background worker; with `epochs`, also
    extend its schedule (a completed run can be extended, not repeated)."""
    run = store.get_run(run_id)
    if run["status"] in ("queued", "running"):
        raise ValueError(f"run {run_id} is still {run['status']}")
    planned = int(run["config"].get("epochs") or 0)
    if epochs is not None and epochs < planned:
        raise ValueError(f"run {run_id} is planned for {planned} epochs; an extension needs more, not {epochs}")
    if run["status"] == "completed" and (epochs is None or epochs == planned):
        raise ValueError(f"run {run_id} is already completed; give more epochs to extend it")
    return _spawn(store, run_id, ["--resume", run_id] + (["--epochs", str(int(epochs))] if epochs else []))


def cancel(run_id: str, store: RunStore) -> bool:
    """Ask the run's worker to stop after its current batch (SIGTERM); False if it is not active."""
    run = store.get_run(run_id)
    if run["status"] not in ("queued", "running") or not run["pid"]:
        return False
    try:
        os.kill(int(run["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        store.reap_stale()
        return False
    return True
