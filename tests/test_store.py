import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from training.store import RunStore


def test_lifecycle_and_wal(tmp_path):
    store = RunStore(tmp_path)
    with sqlite3.connect(store.db_path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rid = store.create_run({"architecture": "solution_a", "epochs": 3, "name": "x"})
    assert store.get_run(rid)["status"] == "queued" and store.run_dir(rid).is_dir()
    store.claim(rid)
    store.start(rid, "CPU")
    store.set_progress(rid, 0, 5, 10)
    store.log_epoch(rid, 0, {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4,
                             "learning_rate": 1e-4}, 2.5)
    assert store.progress(rid)["step"] == 5
    ep = store.epochs(rid)
    assert ep.loc[0, ["epoch", "val_accuracy", "learning_rate", "seconds"]].tolist() == [0, 0.4, 1e-4, 2.5]
    store.finish(rid, "completed")
    run = store.get_run(rid)
    assert run["status"] == "completed" and run["device"] == "CPU" and run["config"]["epochs"] == 3
    with pytest.raises(ValueError):
        store.finish(rid, "running")


def test_dead_worker_is_reported_failed(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create_run({"architecture": "solution_a"})
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    store.claim(rid, proc.pid)
    store.start(rid, "CPU")
    run = store.get_run(rid)
    assert run["status"] == "failed" and "ended without reporting" in run["error"]


def test_silent_worker_on_another_host_is_stale(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create_run({"architecture": "solution_a"})
    store.claim(rid)
    with sqlite3.connect(store.db_path) as con:
        con.execute("UPDATE runs SET host='elsewhere', heartbeat_at=? WHERE id=?", (time.time() - 600, rid))
    assert store.reap_stale() == [rid]
    assert "no heartbeat" in store.get_run(rid)["error"]


def test_concurrent_writer_and_readers(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create_run({"architecture": "solution_a"})
    store.claim(rid)
    errors = []

    def reader():
        try:
            other = RunStore(tmp_path)
            for _ in range(200):
                other.epochs(rid)
                other.progress(rid)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for e in range(100):
        store.log_epoch(rid, e, {"loss": 1.0 / (e + 1)}, 0.1)
        store.set_progress(rid, e, 1, 1)
    for t in threads:
        t.join()
    assert not errors and len(store.epochs(rid)) == 100
