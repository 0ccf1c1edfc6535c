"""`RunStore`: the run database (SQLite in WAL mode) and the run folders.

One writer process per run (the worker) and many readers (the dashboard, the CLI) share it. Every write is
one short transaction, so a worker killed at any instant leaves a consistent database; readers detect dead
workers (on this host by pid and process start time, elsewhere by a silent heartbeat) and report their runs as
failed.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

STATUSES = ("queued", "running", "completed", "failed", "cancelled")
ACTIVE = ("queued", "running")
HEARTBEAT_S = 5.0  # a worker's heartbeat thread writes this often (CNMC_HEARTBEAT_S)
STALE_AFTER_S = 60.0  # a worker on another host silent this long is gone (CNMC_STALE_AFTER_S)


def heartbeat_interval() -> float:
    return float(os.environ.get("CNMC_HEARTBEAT_S", HEARTBEAT_S))


def stale_after() -> float:
    return float(os.environ.get("CNMC_STALE_AFTER_S", STALE_AFTER_S))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, architecture TEXT, status TEXT NOT NULL,
    created_at REAL, started_at REAL, finished_at REAL, heartbeat_at REAL,
    device TEXT, host TEXT, pid INTEGER, error TEXT, config TEXT, epochs_planned INTEGER, pid_start TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL, epoch INTEGER NOT NULL, loss REAL, accuracy REAL, val_loss REAL,
    val_accuracy REAL, learning_rate REAL, seconds REAL, finished_at REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS progress (
    run_id TEXT PRIMARY KEY, epoch INTEGER, step INTEGER, steps INTEGER, updated_at REAL, phase TEXT
);
CREATE TABLE IF NOT EXISTS label_reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, reviewer TEXT, run_id TEXT, name TEXT, path TEXT,
    original_label TEXT, decision TEXT, note TEXT
);
CREATE TABLE IF NOT EXISTS classifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, source TEXT, model TEXT, model_sha256 TEXT,
    file_name TEXT, file_sha256 TEXT, prediction TEXT, prob_all_calibrated REAL, review INTEGER,
    out_of_distribution INTEGER, ood_reason TEXT, error TEXT, rule TEXT
);
"""
AUDIT_COLUMNS = ["at", "source", "model", "model_sha256", "file_name", "file_sha256", "prediction",
                 "prob_all_calibrated", "review", "out_of_distribution", "ood_reason", "error", "rule"]


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, from /proc): with the pid, it names one process, so
    a recycled pid is not mistaken for the worker. None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not a live worker
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(") ", 1)[1].split()
        return fields[0] != "Z" and (start is None or fields[19] == start)
    except (OSError, IndexError):
        return True


class RunStore:
    """Runs, epochs and progress in `<root>/runs.sqlite`; artefacts in `<root>/<run_id>/`."""

    def __init__(self, root: str | os.PathLike = "runs"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "runs.sqlite"
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            columns = {r["name"] for r in con.execute("PRAGMA table_info(runs)")}
            if "pid_start" not in columns:  # a store made before workers were identified by their start time
                con.execute("ALTER TABLE runs ADD COLUMN pid_start TEXT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=30000")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    def _write(self, sql: str, params: tuple = ()) -> None:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute(sql, params)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # --- lifecycle -------------------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def create_run(self, config: dict[str, Any], name: str | None = None) -> str:
        """Register a queued run and create its folder; returns the run id (sortable by creation time)."""
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.run_dir(run_id).mkdir(parents=True)
        self._write("INSERT INTO runs (id, name, architecture, status, created_at, config, epochs_planned) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                    (run_id, name or config.get("name") or "", config.get("architecture"), time.time(),
                     json.dumps(config), config.get("epochs")))
        return run_id

    def claim(self, run_id: str, pid: int | None = None) -> None:
        """The worker process that will run this job announces itself (still queued until it starts)."""
        pid = pid or os.getpid()
        self._write("UPDATE runs SET pid=?, pid_start=?, host=?, heartbeat_at=?, status='queued', error=NULL, "
                    "finished_at=NULL WHERE id=?", (pid, _proc_start(pid), socket.gethostname(), time.time(), run_id))

    def start(self, run_id: str, device: str) -> None:
        now = time.time()
        self._write("UPDATE runs SET status='running', started_at=COALESCE(started_at, ?), heartbeat_at=?, "
                    "device=? WHERE id=?", (now, now, device, run_id))

    def heartbeat(self, run_id: str) -> None:
        self._write("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time(), run_id))

    def finish(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES or status in ACTIVE:
            raise ValueError(f"not a final status: {status}")
        self._write("UPDATE runs SET status=?, finished_at=?, error=?, heartbeat_at=? WHERE id=?",
                    (status, time.time(), error, time.time(), run_id))

    def truncate_epochs(self, run_id: str, from_epoch: int) -> None:
        """Forget epoch rows from `from_epoch` on: a resumed run repeats them from its checkpoint."""
        self._write("DELETE FROM epochs WHERE run_id=? AND epoch>=?", (run_id, int(from_epoch)))

    def update_config(self, run_id: str, config: dict[str, Any]) -> None:
        self._write("UPDATE runs SET config=?, epochs_planned=?, architecture=? WHERE id=?",
                    (json.dumps(config), config.get("epochs"), config.get("architecture"), run_id))

    # --- metrics -------------------------------------------------------------------------------------------
    def log_epoch(self, run_id: str, epoch: int, logs: dict[str, float], seconds: float) -> None:
        vals = [logs.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")]
        self._write("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, epoch, *[None if v is None else float(v) for v in vals], float(seconds), time.time()))
        self._write("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time(), run_id))

    def set_progress(self, run_id: str, epoch: int, step: int, steps: int, phase: str = "train") -> None:
        now = time.time()
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, epoch, step, steps, now, phase))
            con.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (now, run_id))
            con.execute("COMMIT")

    # --- audit trail ---------------------------------------------------------------------------------------
    def log_classifications(self, records: list[dict[str, Any]]) -> None:
        """Append one audit record per classified file (all in one transaction: all or none)."""
        if not records:
            return
        cols = AUDIT_COLUMNS
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(f"INSERT INTO classifications ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                [tuple(r.get(c) for c in cols) for r in records])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def classifications(self, limit: int | None = None) -> pd.DataFrame:
        """The audit trail, newest first, with times as ISO strings."""
        with self._connect() as con:
            rows = con.execute("SELECT * FROM classifications ORDER BY id DESC"
                               + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
        df = pd.DataFrame([dict(r) for r in rows], columns=["id", *AUDIT_COLUMNS])
        df["at"] = pd.to_datetime(df["at"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        return df

    # --- label reviews --------------------------------------------------------------------------------------
    def record_review(self, name: str, original_label: str, decision: str, reviewer: str, note: str = "",
                      run_id: str | None = None, path: str | None = None) -> None:
        """A reviewer's decision on a cell's dataset label; kept forever (the latest per cell counts)."""
        from core.labels import CLASSES, DECISIONS

        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, not {decision!r}")
        if original_label not in CLASSES:
            raise ValueError(f"{name}: label {original_label!r} is not a class")
        if not reviewer.strip():
            raise ValueError("a review needs the reviewer's name")
        self._write("INSERT INTO label_reviews (at, reviewer, run_id, name, path, original_label, decision, note) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), reviewer.strip(), run_id, name, path, original_label, decision, note or ""))

    def reviews(self) -> pd.DataFrame:
        """Every label decision, oldest first, with times as ISO strings."""
        cols = ["id", "at", "reviewer", "run_id", "name", "path", "original_label", "decision", "note"]
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(cols)} FROM label_reviews ORDER BY id").fetchall()
        df = pd.DataFrame([dict(r) for r in rows], columns=cols)
        df["at"] = pd.to_datetime(df["at"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        return df

    def label_overrides(self) -> pd.DataFrame:
        """The overrides the reviews amount to (see `core.labels.overrides_from_reviews`)."""
        from core.labels import overrides_from_reviews

        return overrides_from_reviews(self.reviews())

    # --- reading -------------------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> dict[str, Any]:
        self.reap_stale()
        with self._connect() as con:
            row = con.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run {run_id!r} in {self.db_path}")
        out = dict(row)
        out["config"] = json.loads(out["config"] or "{}")
        return out

    def list_runs(self, status: str | None = None) -> pd.DataFrame:
        self.reap_stale()
        with self._connect() as con:
            q = "SELECT id, name, architecture, status, created_at, started_at, finished_at, device, error, " \
                "epochs_planned FROM runs" + (" WHERE status=?" if status else "") + " ORDER BY created_at DESC"
            rows = con.execute(q, (status,) if status else ()).fetchall()
        return pd.DataFrame([dict(r) for r in rows], columns=["id", "name", "architecture", "status", "created_at",
                                                              "started_at", "finished_at", "device", "error",
                                                              "epochs_planned"])

    def epochs(self, run_id: str) -> pd.DataFrame:
        with self._connect() as con:
            rows = con.execute("SELECT epoch, loss, accuracy, val_loss, val_accuracy, learning_rate, seconds, "
                               "finished_at FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)).fetchall()
        return pd.DataFrame([dict(r) for r in rows], columns=["epoch", "loss", "accuracy", "val_loss",
                                                              "val_accuracy", "learning_rate", "seconds",
                                                              "finished_at"])

    def progress(self, run_id: str) -> dict[str, Any] | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM progress WHERE run_id=?", (run_id,)).fetchone()
        return dict(row) if row else None

    def reap_stale(self, stale_after_s: float | None = None) -> list[str]:
        """Mark runs whose worker is gone as failed.

        A worker on this host is checked directly (its pid and process start time): dead means failed at the
        next read of the store, alive means never failed, however long one phase takes. A worker on another host
        (a shared run store) is judged by its heartbeat thread: silent for `stale_after()` seconds means lost.
        """
        limit = stale_after() if stale_after_s is None else stale_after_s
        now, host = time.time(), socket.gethostname()
        with self._connect() as con:
            rows = con.execute("SELECT id, pid, pid_start, host, heartbeat_at, created_at FROM runs WHERE status IN "
                               "('queued', 'running')").fetchall()
        dead = []
        for r in rows:
            if r["pid"] is None:  # created, no worker yet: the launcher is about to start one
                if now - (r["created_at"] or now) > limit:
                    dead.append((r["id"], "no worker picked up this run"))
                continue
            if r["host"] == host:
                if not _pid_alive(r["pid"], r["pid_start"]):
                    dead.append((r["id"], f"worker process {r['pid']} ended without reporting (killed?)"))
            elif now - (r["heartbeat_at"] or 0) > limit:
                dead.append((r["id"], f"no heartbeat from host {r['host']} for {now - (r['heartbeat_at'] or 0):.0f} s "
                                      "(worker lost)"))
        for run_id, why in dead:
            self._write("UPDATE runs SET status='failed', finished_at=?, error=? WHERE id=? AND status IN "
                        "('queued', 'running')", (now, why, run_id))
        return [d[0] for d in dead]
