"""Launch, cancel and resume training workers as background processes (what the dashboard uses).

A worker is exactly `python -m training run --run-id ID` (or `--resume ID`), started in its own session so it
survives page reloads, closed tabs and restarts of the app. The UI and the worker share only the run store.

Every action is recorded with its actor (`RunStore.record_action`). Cancel sets the run's cancel flag, which the
worker's heartbeat polls, and sends SIGTERM only when the recorded worker is provably this process: same host and
the same process start time as recorded at launch (a pid alone may by now name someone else's process, and a pid
of another host names nothing here).
"""
from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from training.config import RunConfig
from training.store import RunStore, _proc_start

REPO = Path(__file__).resolve().parent.parent


def _spawn(store: RunStore, run_id: str, args: list[str]) -> int:
    log = open(store.run_dir(run_id) / "worker.log", "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "training", "run", *args, "--runs-dir", str(store.root)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    log.close()
    RunStore(store.root).claim(run_id, proc.pid)  # the long lock budget: the process is running already
    return proc.pid


def default_actor() -> str:
    """Who acts when no one is named (the command line, a script): the OS account and host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def launch(config: RunConfig, store: RunStore | None = None, actor: str | None = None) -> str:
    """Register a run (queued), record who launched it and start its worker in the background; returns the run
    id."""
    from core.nets.models import ensure_init

    cfg = config.resolved()
    ensure_init(cfg.architecture, cfg.init)  # e.g. ImageNet weights offline: refused before anything is registered
    store = store or RunStore(cfg.runs_dir)
    run_id = store.create_run(cfg.to_dict())
    store.record_action(run_id, "launch", actor or default_actor())
    cfg.save(store.run_dir(run_id) / "config.json")
    _spawn(store, run_id, ["--run-id", run_id])
    return run_id


def resume(run_id: str, store: RunStore, epochs: int | None = None, actor: str | None = None) -> int:
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
    store.record_action(run_id, "extend" if epochs is not None and epochs != planned else "resume",
                        actor or default_actor(), "" if epochs is None else f"epochs {planned} -> {int(epochs)}")
    return _spawn(store, run_id, ["--resume", run_id] + (["--epochs", str(int(epochs))] if epochs else []))


def cancel(run_id: str, store: RunStore, actor: str | None = None) -> bool:
    """Ask the run's worker to stop after its current batch: the cancel flag in the store (its heartbeat sees it
    within seconds, on any host), and SIGTERM at once when `is_local_worker` proves the recorded process is it.
    False if the run is not active."""
    run = store.get_run(run_id)
    if run["status"] not in ("queued", "running"):
        return False
    store.request_cancel(run_id)
    store.record_action(run_id, "cancel", actor or default_actor())
    if is_local_worker(run):
        try:
            os.kill(int(run["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            store.reap_stale()
    return True


def is_local_worker(run: dict) -> bool:
    """Whether the run's recorded worker is a process of this host that is still the one recorded at launch:
    same host name and same process start time (a recycled pid has another). Without a recorded start time
    (no /proc where it was launched) nothing is proven: no signal, the flag alone stops it."""
    pid, start = run.get("pid"), run.get("pid_start")
    if not pid or not start or run.get("host") != socket.gethostname():
        return False
    return _proc_start(int(pid)) == start
