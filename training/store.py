"""`RunStore`: the run database (SQLite in WAL mode) and the run folders.

One writer process per run (the worker) and many readers (the dashboard, the CLI) share it. Every write is
one short transaction, so a worker killed at any instant leaves a consistent database; readers detect dead
workers by their heartbeat (and, on this host, by their pid) and report those runs as failed.
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
STALE_AFTER_S = 90.0  # no heartbeat for this long: the worker is gone

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, architecture TEXT, status TEXT NOT NULL,
    created_at REAL, started_at REAL, finished_at REAL, heartbeat_at REAL,
    device TEXT, host TEXT, pid INTEGER, error TEXT, config TEXT, epochs_planned INTEGER
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL, epoch INTEGER NOT NULL, loss REAL, accuracy REAL, val_loss REAL,
    val_accuracy REAL, learning_rate REAL, seconds REAL, finished_at REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS progress (
    run_id TEXT PRIMARY KEY, epoch INTEGER, step INTEGER, steps INTEGER, updated_at REAL, phase TEXT
);
CREATE TABLE IF NOT EXISTS classifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, source TEXT, model TEXT, model_sha256 TEXT,
    file_name TEXT, file_sha256 TEXT, prediction TEXT, prob_all_calibrated REAL, review INTEGER,
    out_of_distribution INTEGER, ood_reason TEXT, error TEXT, rule TEXT
);
"""
AUDIT_COLUMNS = ["at", "source", "model", "model_sha256", "file_name", "file_sha256", "prediction",
                 "prob_all_calibrated", "review", "out_of_distribution", "ood_reason", "error", "rule"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not a live worker
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
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
        self._write("UPDATE runs SET pid=?, host=?, heartbeat_at=?, status='queued', error=NULL, finished_at=NULL "
                    "WHERE id=?", (pid or os.getpid(), socket.gethostname(), time.time(), run_id))

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

    def reap_stale(self, stale_after: float = STALE_AFTER_S) -> list[str]:
        """Mark runs whose worker died (pid gone on this host, or silent too long) as failed."""
        now, host = time.time(), socket.gethostname()
        with self._connect() as con:
            rows = con.execute("SELECT id, pid, host, heartbeat_at, created_at FROM runs WHERE status IN "
                               "('queued', 'running')").fetchall()
        dead = []
        for r in rows:
            if r["pid"] is None:  # created, no worker yet: the launcher is about to start one
                if now - (r["created_at"] or now) > stale_after:
                    dead.append((r["id"], "no worker picked up this run"))
                continue
            if r["host"] == host and not _pid_alive(r["pid"]):
                dead.append((r["id"], f"worker process {r['pid']} ended without reporting (killed?)"))
            elif now - (r["heartbeat_at"] or 0) > stale_after:
                dead.append((r["id"], f"no heartbeat for {now - (r['heartbeat_at'] or 0):.0f} s (worker lost)"))
        for run_id, why in dead:
            self._write("UPDATE runs SET status='failed', finished_at=?, error=? WHERE id=? AND status IN "
                        "('queued', 'running')", (now, why, run_id))
        return [d[0] for d in dead]
