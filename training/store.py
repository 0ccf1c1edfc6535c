"""`RunStore`: the run database (SQLite in WAL mode) and the run folders.

One writer process per run (the worker) and many readers (the dashboard, the CLI) share it. Every write is
one short transaction, so a worker killed at any instant leaves a consistent database; readers detect dead
workers (on this host by pid and process start time, elsewhere by a silent heartbeat) and report their runs as
failed.

Several users at once: every call opens its own connection (so any thread of the Streamlit server, and any
worker process, may call any method), waits up to 30 s for another writer (`busy_timeout`), writes in a
`BEGIN IMMEDIATE` transaction (the write lock is taken first, so a transaction never fails half-way for a lock)
and retries a transaction refused with "database is locked". Audit records and label reviews carry a
client-made `uid` under a UNIQUE index, so a retried write never lands twice. `backup()` copies the live store
with SQLite's online backup API; `restore()` puts a backup back, holding a maintenance lock file meanwhile.

The dashboard's pages write through a *page store* (`RunStore.for_page`): a short lock budget (a few seconds, then
`StoreBusy`: "the store is busy, try again", instead of a page hanging for minutes behind a long writer) and
refusal while a restore holds the maintenance lock (`StoreMaintenance`). Workers and the CLI keep the long budget.
Who launched, cancelled, resumed or extended a run is kept in `run_actions`; a cancel is a flag in the store that
the worker's heartbeat polls (`request_cancel`), and a signal only to a process proven to be the worker.
"""
from __future__ import annotations

import json
import os
import random
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
CREATE TABLE IF NOT EXISTS run_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, run_id TEXT, action TEXT, actor TEXT, host TEXT, detail TEXT
);
CREATE TABLE IF NOT EXISTS classifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, source TEXT, model TEXT, model_sha256 TEXT,
    file_name TEXT, file_sha256 TEXT, prediction TEXT, prob_all_calibrated REAL, review INTEGER,
    out_of_distribution INTEGER, ood_reason TEXT, error TEXT, rule TEXT
);
CREATE TABLE IF NOT EXISTS verifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, sample TEXT NOT NULL, field TEXT, cell_name TEXT NOT NULL,
    pre_call TEXT, decision TEXT NOT NULL, verifier TEXT NOT NULL, model TEXT, model_sha256 TEXT, field_sha256 TEXT,
    crop TEXT, uid TEXT
);
"""
# added after the first release: old stores gain them on open (old code ignores them; a NULL uid never clashes)
_ADDED_COLUMNS = {"runs": [("pid_start", "TEXT"), ("cancel_requested", "REAL")], "label_reviews": [("uid", "TEXT")],
                  "classifications": [("uid", "TEXT")]}
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS label_reviews_uid ON label_reviews (uid);
CREATE UNIQUE INDEX IF NOT EXISTS classifications_uid ON classifications (uid);
CREATE UNIQUE INDEX IF NOT EXISTS verifications_uid ON verifications (uid);
CREATE INDEX IF NOT EXISTS verifications_sample ON verifications (sample);
"""
BUSY_TIMEOUT_S = 30.0  # how long one write waits for another writer before "database is locked"
LOCK_RETRIES = 5  # a transaction refused as locked is tried again this many times (with a short random pause)
PAGE_BUSY_TIMEOUT_S = 2.0  # a dashboard page's write waits this long for another writer (`RunStore.for_page`)
PAGE_LOCK_RETRIES = 1  # ... and is tried again once: a page says "busy" within about 5 s, never hangs
MAINTENANCE_FILE = "runs.sqlite.maintenance"  # present while `restore` replaces the store: page writes refused
RUN_ACTIONS = ("launch", "cancel", "resume", "extend", "delete")


class StoreUnavailable(RuntimeError):
    """A page's write that cannot be made now; the message says why and what to do."""


class StoreBusy(StoreUnavailable):
    """Another writer held the store past a page's short budget."""


class StoreMaintenance(StoreUnavailable):
    """A restore holds the maintenance lock."""


def _locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)
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

    def __init__(self, root: str | os.PathLike = "runs", busy_timeout_s: float = BUSY_TIMEOUT_S,
                 lock_retries: int = LOCK_RETRIES, page: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "runs.sqlite"
        self.busy_timeout_s, self.lock_retries, self.page = busy_timeout_s, lock_retries, page
        try:
            self._open()
        except sqlite3.OperationalError as exc:
            if page and _locked(exc):
                raise StoreBusy(BUSY_TEXT) from exc
            raise

    @classmethod
    def for_page(cls, root: str | os.PathLike) -> "RunStore":
        """The store as a dashboard page writes it: a short lock budget, and no writes under maintenance."""
        return cls(root, PAGE_BUSY_TIMEOUT_S, PAGE_LOCK_RETRIES, page=True)

    def _open(self) -> None:
        """WAL mode, the schema and, for a store made by an older version, its migration."""
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
        if self._missing_columns():  # a store made by an older version: one migration, whoever opens it first
            def migrate(con):
                for table, column, kind in self._missing_columns(con):
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self._transaction(migrate)
        with self._connect() as con:
            con.executescript(_INDEXES)

    def _missing_columns(self, con: sqlite3.Connection | None = None) -> list[tuple[str, str, str]]:
        if con is None:
            with self._connect() as con:
                return self._missing_columns(con)
        missing = []
        for table, added in _ADDED_COLUMNS.items():
            have = {r["name"] for r in con.execute(f"PRAGMA table_info({table})")}
            missing += [(table, c, kind) for c, kind in added if c not in have]
        return missing

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    def _transaction(self, work):
        """`work(con)` in one `BEGIN IMMEDIATE` transaction: all of it or none. A transaction refused as locked
        or busy (past the busy timeout, or SQLite's deadlock guard) is rolled back and tried again; callers make
        their inserts idempotent (a uid) where a second try could otherwise duplicate a row. A page store
        refuses under maintenance and says "busy" past its short budget."""
        if self.page:
            why = maintenance(self.root)
            if why:
                raise StoreMaintenance(f"The store is under maintenance ({why}); try again when it is over.")
        for attempt in range(self.lock_retries + 1):
            with self._connect() as con:
                try:
                    con.execute("BEGIN IMMEDIATE")
                    try:
                        out = work(con)
                        con.execute("COMMIT")
                        return out
                    except BaseException:
                        if con.in_transaction:
                            con.execute("ROLLBACK")
                        raise
                except sqlite3.OperationalError as exc:
                    if not _locked(exc):
                        raise
                    if attempt == self.lock_retries:
                        if self.page:
                            raise StoreBusy(BUSY_TEXT) from exc
                        raise
            time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))

    def _write(self, sql: str, params: tuple = ()) -> None:
        self._transaction(lambda con: con.execute(sql, params))

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
        """The worker process that will run this job announces itself (still queued until it starts). A new
        process (another pid: a resume) starts without its predecessor's cancel request; the same one (the launcher
        claimed it first) keeps a cancel asked for in between."""
        pid = pid or os.getpid()
        self._write("UPDATE runs SET cancel_requested=CASE WHEN pid IS ? THEN cancel_requested ELSE NULL END, "
                    "pid=?, pid_start=?, host=?, heartbeat_at=?, status='queued', error=NULL, finished_at=NULL "
                    "WHERE id=?", (pid, pid, _proc_start(pid), socket.gethostname(), time.time(), run_id))

    def start(self, run_id: str, device: str) -> None:
        now = time.time()
        self._write("UPDATE runs SET status='running', started_at=COALESCE(started_at, ?), heartbeat_at=?, "
                    "device=? WHERE id=?", (now, now, device, run_id))

    def heartbeat(self, run_id: str) -> bool:
        """The worker is alive; returns whether a cancel was requested (the worker's heartbeat polls it)."""
        def work(con):
            con.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time(), run_id))
            row = con.execute("SELECT cancel_requested FROM runs WHERE id=?", (run_id,)).fetchone()
            return bool(row and row[0])
        return self._transaction(work)

    def request_cancel(self, run_id: str) -> None:
        """Ask the run's worker to stop, wherever it runs: its heartbeat sees the flag within a few seconds."""
        self._write("UPDATE runs SET cancel_requested=? WHERE id=?", (time.time(), run_id))

    def record_action(self, run_id: str, action: str, actor: str, detail: str = "") -> None:
        """Who did what to a run (launch, cancel, resume, extend, delete), kept forever beside the run."""
        if action not in RUN_ACTIONS:
            raise ValueError(f"unknown run action {action!r}; known: {', '.join(RUN_ACTIONS)}")
        self._write("INSERT INTO run_actions (at, run_id, action, actor, host, detail) VALUES (?, ?, ?, ?, ?, ?)",
                    (time.time(), run_id, action, actor, socket.gethostname(), detail))

    def actions(self, run_id: str | None = None) -> pd.DataFrame:
        """The run actions, oldest first, with times as ISO strings."""
        cols = ["id", "at", "run_id", "action", "actor", "host", "detail"]
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(cols)} FROM run_actions" + (" WHERE run_id=?" if run_id else "")
                               + " ORDER BY id", (run_id,) if run_id else ()).fetchall()
        df = pd.DataFrame([dict(r) for r in rows], columns=cols)
        df["at"] = pd.to_datetime(df["at"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        return df

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
        now = time.time()

        def work(con):
            con.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (run_id, epoch, *[None if v is None else float(v) for v in vals], float(seconds), now))
            con.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (now, run_id))
        self._transaction(work)

    def set_progress(self, run_id: str, epoch: int, step: int, steps: int, phase: str = "train") -> None:
        now = time.time()

        def work(con):
            con.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, epoch, step, steps, now, phase))
            con.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (now, run_id))
        self._transaction(work)

    def set_phase(self, run_id: str, phase: str) -> None:
        """Say what the run is doing (e.g. why it waits) without touching its epoch/step progress."""
        self._write("INSERT INTO progress (run_id, epoch, step, steps, updated_at, phase) VALUES (?, 0, 0, 0, ?, ?) "
                    "ON CONFLICT (run_id) DO UPDATE SET phase=excluded.phase, updated_at=excluded.updated_at",
                    (run_id, time.time(), phase))

    # --- audit trail ---------------------------------------------------------------------------------------
    def log_classifications(self, records: list[dict[str, Any]]) -> list[str]:
        """Append one audit record per classified file (all in one transaction: all or none); returns their uids.

        A record's `uid` (made here when absent) makes the write idempotent: a record already stored under it
        is not stored again (a retried transaction, or a caller sending the same records twice)."""
        if not records:
            return []
        cols = [*AUDIT_COLUMNS, "uid"]
        uids = [str(r.get("uid") or uuid.uuid4().hex) for r in records]
        rows = [tuple(r.get(c) for c in AUDIT_COLUMNS) + (uid,) for r, uid in zip(records, uids)]
        self._transaction(lambda con: con.executemany(
            f"INSERT OR IGNORE INTO classifications ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows))
        return uids

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
                      run_id: str | None = None, path: str | None = None, uid: str | None = None) -> str:
        """A reviewer's decision on a cell's dataset label; kept forever (the latest per cell counts). Returns its
        uid; giving the same `uid` again (a retried or double-sent decision) stores it once."""
        from core.data.labels import CLASSES, DECISIONS

        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, not {decision!r}")
        if original_label not in CLASSES:
            raise ValueError(f"{name}: label {original_label!r} is not a class")
        if not reviewer.strip():
            raise ValueError("a review needs the reviewer's name")
        uid = str(uid or uuid.uuid4().hex)
        self._write("INSERT OR IGNORE INTO label_reviews (at, reviewer, run_id, name, path, original_label, decision, "
                    "note, uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), reviewer.strip(), run_id, name, path, original_label, decision, note or "", uid))
        return uid

    def reviews(self) -> pd.DataFrame:
        """Every label decision, oldest first, with times as ISO strings."""
        cols = ["id", "at", "reviewer", "run_id", "name", "path", "original_label", "decision", "note"]
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(cols)} FROM label_reviews ORDER BY id").fetchall()
        df = pd.DataFrame([dict(r) for r in rows], columns=cols)
        df["at"] = pd.to_datetime(df["at"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        return df

    def label_overrides(self) -> pd.DataFrame:
        """The overrides the reviews amount to (see `core.data.labels.overrides_from_reviews`)."""
        from core.data.labels import overrides_from_reviews

        return overrides_from_reviews(self.reviews())

    # --- verification of smear uploads ------------------------------------------------------------------------
    def record_verification(self, sample: str, cell_name: str, decision: str, verifier: str, *, field: str = "",
                            pre_call: str = "", model: str = "", model_sha256: str = "", field_sha256: str = "",
                            crop: str | None = None, uid: str | None = None) -> str:
        """One person's decision on one white cell of a sample (`core.smear.verify.DECISIONS`), appended and kept
        forever: two people verifying the same cell both keep their record (the latest is the cell's current
        decision, and the view shows where they differ). `crop`: where the cell's model input was kept for
        teaching (relative to the store's folder). Returns its uid; the same `uid` again is stored once."""
        from core.smear.verify import DECISIONS

        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, not {decision!r}")
        if not verifier.strip():
            raise ValueError("a verification needs the verifier's identity")
        uid = str(uid or uuid.uuid4().hex)
        self._write("INSERT OR IGNORE INTO verifications (at, sample, field, cell_name, pre_call, decision, verifier, "
                    "model, model_sha256, field_sha256, crop, uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), sample, field, cell_name, pre_call, decision, verifier.strip(), model, model_sha256,
                     field_sha256, crop, uid))
        return uid

    def verifications(self, sample: str | None = None) -> pd.DataFrame:
        """Every verification decision (of one sample, or all), oldest first, with times as ISO strings."""
        cols = ["id", "at", "sample", "field", "cell_name", "pre_call", "decision", "verifier", "model",
                "model_sha256", "field_sha256", "crop"]
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(cols)} FROM verifications" + (" WHERE sample=?" if sample else "")
                               + " ORDER BY id", (sample,) if sample else ()).fetchall()
        df = pd.DataFrame([dict(r) for r in rows], columns=cols)
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

    # --- backups -------------------------------------------------------------------------------------------
    def backup(self, dest: str | os.PathLike) -> Path:
        """A consistent copy of the store in one self-contained SQLite file (no -wal beside it), taken with
        SQLite's online backup API: safe while workers and the dashboard write (in WAL mode the copy reads one
        snapshot and writers are not held up). Written to a temporary name, checked (`integrity_check`) and
        renamed, so `dest` is never a half-written file. Run folders (models, logs) are plain files: copy them
        with any file tool."""
        from core.data.atomic import atomic_path

        dest = Path(dest)
        with atomic_path(dest) as part:
            with self._connect() as src:
                out = sqlite3.connect(part)
                try:
                    src.backup(out)  # every page in one step: one read transaction, one snapshot
                    out.execute("PRAGMA journal_mode=DELETE")
                    check = out.execute("PRAGMA integrity_check").fetchone()[0]
                finally:
                    out.close()
            if check != "ok":  # raised inside: the temporary copy is removed, `dest` untouched
                raise RuntimeError(f"the backup of {self.db_path} failed its integrity check: {check}")
        return dest


BUSY_TEXT = "The store is busy (another write is under way); try again in a moment."


def maintenance(root: str | os.PathLike) -> str | None:
    """What holds the store's maintenance lock (e.g. "restore by pid 12 on host-a since …"), None when free."""
    path = Path(root) / MAINTENANCE_FILE
    try:
        info = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{path.name} present"
    return (f"{info.get('what', 'maintenance')} by pid {info.get('pid')} on {info.get('host')} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('at') or 0))}")


@contextmanager
def maintenance_lock(root: str | os.PathLike, what: str = "restore") -> Iterator[Path]:
    """Hold the store's maintenance lock for the block (a file made exclusively; page writes refuse while it is
    there). One left by a dead process of this host is taken over; any other refuses, naming its holder."""
    path = Path(root) / MAINTENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    info = json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(), "at": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if not _stale_lock(path):
                raise RuntimeError(f"not restoring: the store is under maintenance ({maintenance(root)}); "
                                   f"remove {path} only if no such process runs") from None
            path.unlink(missing_ok=True)
    else:
        raise RuntimeError(f"not restoring: could not take the maintenance lock {path}")
    with os.fdopen(fd, "w") as fh:
        fh.write(info)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _stale_lock(path: Path) -> bool:
    """A maintenance lock whose holder, on this host, is gone."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return False
    return info.get("host") == socket.gethostname() and bool(info.get("pid")) and not _pid_alive(int(info["pid"]))


def check_store_file(path: str | os.PathLike) -> str:
    """'ok' if `path` is a sound SQLite run store (`PRAGMA integrity_check` passes and it holds a runs table),
    else what is wrong with it. The file is opened read-only."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is not a file"
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return f"{path} is not a readable SQLite database ({exc})"
    if rows != ["ok"]:
        return f"{path} fails SQLite's integrity check: " + "; ".join(rows[:5])
    if "runs" not in tables:
        return f"{path} is a SQLite database but not a run store (no runs table)"
    return "ok"


def restore(backup: str | os.PathLike, root: str | os.PathLike, force: bool = False) -> Path | None:
    """Put a backup (`RunStore.backup`) back as the run store at `root`.

    Refused when the backup fails its integrity check; when a store exists at `root` and `force` is not given;
    and, even with `force`, while runs of that store are queued or running (stop them first; also stop the
    dashboard, whose sessions would otherwise keep writing into the store being replaced). The replaced store is
    first saved beside it (`runs.sqlite.before-restore-<time>`, returned; None when there was none). The copy goes
    through SQLite's backup API into the store itself, so its WAL files stay consistent. A backup made by an
    older version is brought up to this version's schema. While it works it holds the maintenance lock
    (`MAINTENANCE_FILE`): dashboard writes say "the store is under maintenance" instead of writing."""
    problem = check_store_file(backup)
    if problem != "ok":
        raise ValueError(f"not restoring: {problem}")
    root = Path(root)
    with maintenance_lock(root, "restore"):
        return _restore(Path(backup), root, force)


def _restore(backup: Path, root: Path, force: bool) -> Path | None:
    """`restore` under the maintenance lock."""
    target = root / "runs.sqlite"
    saved = None
    if target.exists():
        if not force:
            raise FileExistsError(f"{target} exists; give --force to replace it (it is saved beside it first)")
        current = RunStore(root)
        active = current.list_runs()
        active = active[active["status"].isin(ACTIVE)]
        if len(active):
            raise RuntimeError(f"not restoring: {target} is in use, runs {', '.join(active['id'])} are "
                               f"{'/'.join(sorted(set(active['status'])))}; cancel them or let them finish first")
        saved = current.backup(root / f"runs.sqlite.before-restore-{time.strftime('%Y%m%d-%H%M%S')}")
    store = RunStore(root)
    src = sqlite3.connect(f"file:{Path(backup)}?mode=ro", uri=True)
    try:
        with store._connect() as con:
            src.backup(con)
    finally:
        src.close()
    RunStore(root)  # WAL and any columns added since the backup was made
    return saved
