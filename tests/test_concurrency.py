"""Several people at once: classifications, label reviews and run launches from concurrent dashboard sessions
(threads of one server process) and a training worker (another process) all land in the run store, each exactly
once; backups taken while they write are consistent and restore; a second launch on a busy device waits and says
for whom."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from training import store as store_mod
from training.audit import record
from training.store import RunStore, check_store_file, restore

REPO = Path(__file__).resolve().parent.parent
THREADS, EACH = 8, 50

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from training.store import RunStore
    root, run_id, stop = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = RunStore(root)
    store.claim(run_id)
    store.start(run_id, "CPU")
    epoch, step, end = 0, 0, time.time() + 60
    while not stop.exists() and time.time() < end:
        store.set_progress(run_id, epoch, step, 10)
        step += 1
        if step == 10:
            store.log_epoch(run_id, epoch, {"loss": 1.0 / (epoch + 1), "accuracy": 0.5}, 0.01)
            epoch, step = epoch + 1, 0
        store.heartbeat(run_id)
    store.finish(run_id, "completed")
    print(epoch)
""")


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0]


def uids(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute(f"SELECT uid FROM {table}")]


def classify_one(runs: Path, who: int, k: int) -> None:
    """What the Classify page's service does per upload: a classification table to the audit trail (one
    RunStore per call, as the dashboard opens one)."""
    table = pd.DataFrame([{"name": f"cell-{who}-{k}.png", "prediction": "all", "prob_all_calibrated": 0.7,
                           "uncertain": False, "out_of_distribution": False, "ood_reason": None, "error": None}])
    record(RunStore(runs), table, {f"cell-{who}-{k}.png": f"{who}-{k}".encode()}, "starter", "abc", None,
           source=f"dashboard (user{who})")


def review_one(runs: Path, who: int, k: int) -> str:
    return RunStore(runs).record_review(f"UID_{who}_{k}_1_all.bmp", "all", "label is wrong", f"user{who}",
                                        note=f"{who}-{k}")


def run_sessions(runs: Path, errors: list, done: list | None = None, stop: threading.Event | None = None):
    def session(who: int):
        try:
            k = 0
            while (k < EACH) if stop is None else not stop.is_set():
                classify_one(runs, who, k)
                uid = review_one(runs, who, k)
                if done is not None:
                    done.append(uid)  # after the call returned: committed
                k += 1
        except Exception as exc:  # noqa: BLE001 - collected and asserted by the caller
            errors.append(exc)
    return [threading.Thread(target=session, args=(w,)) for w in range(THREADS)]


def test_sessions_and_a_worker_process_lose_and_duplicate_nothing(tmp_path):
    runs = tmp_path / "runs"
    store = RunStore(runs)
    rid = store.create_run({"architecture": "solution_a", "epochs": 1000})
    stop = tmp_path / "stop"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(runs), rid, str(stop)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    try:
        deadline = time.time() + 60
        while store.progress(rid) is None and time.time() < deadline:  # the worker is writing before we start
            time.sleep(0.05)
        errors: list = []
        threads = run_sessions(runs, errors)
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - t0
    finally:
        stop.touch()
        out, _ = worker.communicate(timeout=60)
    assert not errors, errors[:3]
    assert worker.returncode == 0 and store.get_run(rid)["status"] == "completed"
    audit = store.classifications()
    reviews = store.reviews()
    want_files = {f"cell-{w}-{k}.png" for w in range(THREADS) for k in range(EACH)}
    assert len(audit) == THREADS * EACH and set(audit["file_name"]) == want_files  # each once, none lost
    assert len(reviews) == THREADS * EACH and reviews["note"].nunique() == THREADS * EACH
    assert sorted(reviews["reviewer"].unique()) == [f"user{w}" for w in range(THREADS)]
    assert store.epochs(rid)["epoch"].tolist() == list(range(int(out.strip())))  # the worker's writes all there
    assert integrity(store.db_path) == "ok"
    print(f"{THREADS} sessions x {EACH} classifications + {EACH} reviews beside a worker process: {seconds:.1f} s")


def test_a_retried_write_is_stored_once(tmp_path):
    store = RunStore(tmp_path)
    uid = store.record_review("UID_1_1_1_all.bmp", "all", "unsure", "ana")
    assert store.record_review("UID_1_1_1_all.bmp", "all", "unsure", "ana", uid=uid) == uid
    rec = {"at": time.time(), "source": "cli", "file_name": "a.png", "uid": "fixed-uid"}
    store.log_classifications([rec])
    store.log_classifications([rec, {**rec, "uid": None, "file_name": "b.png"}])
    assert len(store.reviews()) == 1
    assert sorted(store.classifications()["file_name"]) == ["a.png", "b.png"]


def test_a_write_refused_as_locked_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.1)  # "database is locked" after 0.1 s instead of 30 s
    store = RunStore(tmp_path)
    holder = sqlite3.connect(store.db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock longer than the busy timeout
    threading.Timer(0.4, lambda: holder.execute("COMMIT")).start()
    t0 = time.time()
    store.record_review("UID_1_1_1_all.bmp", "all", "unsure", "ana")
    assert time.time() - t0 >= 0.3 and len(store.reviews()) == 1
    holder.close()


def test_a_store_from_an_older_version_gains_the_new_columns(tmp_path):
    with sqlite3.connect(tmp_path / "runs.sqlite") as con:  # label_reviews and classifications without uid
        con.executescript(store_mod._SCHEMA)  # the tables as they were before the uid column
        con.execute("INSERT INTO label_reviews (at, reviewer, name, original_label, decision) "
                    "VALUES (1, 'old', 'x.bmp', 'all', 'unsure')")
    for table in ("label_reviews", "classifications"):
        with sqlite3.connect(tmp_path / "runs.sqlite") as con:
            assert "uid" not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
    threads = [threading.Thread(target=RunStore, args=(tmp_path,)) for _ in range(4)]  # several open it at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = RunStore(tmp_path)
    store.record_review("y.bmp", "hem", "unsure", "new")
    assert store.reviews()["reviewer"].tolist() == ["old", "new"]


def test_backup_while_sessions_write_restores_everything_written_before_it(tmp_path):
    runs = tmp_path / "runs"
    store = RunStore(runs)
    errors: list = []
    done: list = []
    stop = threading.Event()
    threads = run_sessions(runs, errors, done, stop)
    for t in threads:
        t.start()
    try:
        while len(done) < 100:
            time.sleep(0.01)
        before = list(done)  # committed before the backup starts
        backup = store.backup(tmp_path / "backups" / "runs-backup.sqlite")
        time.sleep(0.3)  # and the sessions keep writing after it
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert check_store_file(backup) == "ok" and not Path(str(backup) + "-wal").exists()
    restored = tmp_path / "restored"
    assert restore(backup, restored) is None
    got = uids(restored / "runs.sqlite", "label_reviews")
    assert set(before) <= set(got) and len(got) == len(set(got))
    assert len(got) < len(done)  # the copy is a snapshot: what came after it is not in it
    assert integrity(restored / "runs.sqlite") == "ok"
    assert len(RunStore(restored).classifications()) >= len(before)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_backup_and_restore_commands(tmp_path):
    runs, other = tmp_path / "runs", tmp_path / "other"
    RunStore(runs).record_review("a.bmp", "all", "unsure", "ana")
    RunStore(other).record_review("b.bmp", "hem", "unsure", "ben")
    out = tmp_path / "b.sqlite"
    done = cli("backup", "--runs-dir", str(runs), "--out", str(out))
    assert done.returncode == 0 and out.is_file() and str(out) in done.stdout, done.stderr

    refused = cli("restore", str(out), "--runs-dir", str(other))  # a store is there: refused without --force
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert RunStore(other).reviews()["reviewer"].tolist() == ["ben"]

    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    refused = cli("restore", str(bad), "--runs-dir", str(other), "--force")  # a damaged file: refused
    assert refused.returncode != 0 and "not restoring" in refused.stderr
    assert RunStore(other).reviews()["reviewer"].tolist() == ["ben"]

    store = RunStore(other)
    rid = store.create_run({"architecture": "solution_a"})
    store.claim(rid)  # a live worker (this process): the store is in use, refused even with --force
    with pytest.raises(RuntimeError, match="in use"):
        restore(out, other, force=True)
    store.finish(rid, "cancelled")

    done = cli("restore", str(out), "--runs-dir", str(other), "--force")
    assert done.returncode == 0, done.stderr
    assert RunStore(other).reviews()["reviewer"].tolist() == ["ana"]
    saved = list(other.glob("runs.sqlite.before-restore-*"))
    assert len(saved) == 1 and check_store_file(saved[0]) == "ok"  # what it replaced is kept beside it
    assert integrity(other / "runs.sqlite") == "ok"


def test_a_waiting_run_says_whom_it_waits_for(tmp_path, monkeypatch):
    from training.worker import DeviceQueue, StopFlag

    monkeypatch.setenv("CNMC_LOCK_DIR", str(tmp_path / "locks"))
    store = RunStore(tmp_path)
    b = store.create_run({"architecture": "solution_a", "epochs": 2})
    first = DeviceQueue("cpu", StopFlag(), "RUN-A").__enter__()
    entered = threading.Event()

    def second():
        with DeviceQueue("cpu", StopFlag(), b, on_wait=lambda why: store.set_phase(b, why)):
            entered.set()

    t = threading.Thread(target=second)
    t.start()
    deadline = time.time() + 10
    while not (store.progress(b) or {}).get("phase") and time.time() < deadline:
        time.sleep(0.05)
    assert store.progress(b)["phase"] == f"waiting for run RUN-A (process {os.getpid()}) on this device (cpu)"
    assert not entered.is_set()
    first.__exit__(None, None, None)
    t.join(10)
    assert entered.is_set()


@pytest.mark.slow
def test_second_launch_on_a_busy_device_is_queued_with_its_reason(tmp_path, monkeypatch):
    """A real `jobs.launch` (its background worker process) while the device is held: it stays queued, its
    progress says which run it waits for, and it can be cancelled while it waits."""
    pytest.importorskip("keras")
    from helpers import tiny, wait_for
    from training import jobs
    from training.worker import DeviceQueue, StopFlag

    monkeypatch.setenv("CNMC_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the worker's device is the CPU, whatever this machine has
    store = RunStore(tmp_path / "runs")
    holder = DeviceQueue("cpu", StopFlag(), "RUN-A").__enter__()  # the first run, training on the device
    try:
        rid = jobs.launch(tiny(tmp_path / "no-data-needed-while-queued", store.root), store)
        phase = wait_for(lambda: (store.progress(rid) or {}).get("phase"), timeout=120)
        run = store.get_run(rid)
        assert run["status"] == "queued" and phase.startswith("waiting for run RUN-A"), (run, phase)
        assert jobs.cancel(rid, store)
        run = wait_for(lambda: (r := store.get_run(rid))["status"] != "queued" and r, timeout=60)
        assert run["status"] == "cancelled" and "while queued" in run["error"]
    finally:
        holder.__exit__(None, None, None)
