"""Runs you can trust: cancel keeps work, resume continues at the next step, a live worker is never declared
dead, a killed one is, SIGKILL at any moment leaves a consistent store, runs survive a moved dataset."""
import json
import os
import shutil
import signal
import sqlite3
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import numpy as np
import pytest

pytest.importorskip("keras")

from training import jobs  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.data import BalancedBatches, CacheBatches  # noqa: E402
from training.store import RunStore  # noqa: E402
from helpers import tiny, wait_for  # noqa: E402
from training.trainer import train  # noqa: E402
from training.worker import StopFlag  # noqa: E402

pytestmark = pytest.mark.slow


def assert_ledger_complete(state: dict, epochs: int, steps: int) -> None:
    """Every step of every epoch trained exactly once, in order, across however many processes."""
    covered = {}
    for epoch, first, end in state["ledger"]:
        assert first == covered.get(epoch, 0), (epoch, first, state["ledger"])  # no gap, no repeat
        covered[epoch] = end
    assert covered == {e: steps for e in range(epochs)}, state["ledger"]


def assert_history_clean(store: RunStore, rid: str, epochs: int) -> None:
    assert store.epochs(rid)["epoch"].tolist() == list(range(epochs))
    assert pd.read_csv(store.run_dir(rid) / "history.csv")["epoch"].tolist() == list(range(epochs))


def test_cancel_mid_epoch_then_resume_starts_at_the_next_step(synth_small, tmp_path, monkeypatch):
    served: list[tuple[int, int]] = []
    flag = StopFlag()
    original = BalancedBatches.__getitem__

    def spy(self, i):
        served.append(self.position(i))
        if self.position(i) == (1, 3):
            flag.event.set()  # the dashboard's Cancel, during epoch 2
        return original(self, i)

    monkeypatch.setattr(BalancedBatches, "__getitem__", spy)
    store = RunStore(tmp_path)
    cfg = tiny(synth_small, tmp_path, epochs=3, samples_per_class=96, early_stopping=True, es_patience=50)
    rid = train(cfg, store, stop=flag)
    run = store.get_run(rid)
    assert run["status"] == "cancelled" and "step" in run["error"], run["error"]
    folder = store.run_dir(rid)
    state = json.loads((folder / "state.json").read_text())
    steps = state["steps_per_epoch"]
    assert state["epoch"] == 1 and 0 < state["step"] < steps  # stopped inside epoch 2, not at its end
    assert (folder / state["checkpoint"]).is_file() and zipfile.is_zipfile(folder / state["checkpoint"])
    assert os.path.samefile(folder / "last.keras", folder / state["checkpoint"])
    assert {"ReduceLROnPlateau", "EarlyStopping"} <= set(state["callbacks"])  # their counters travel too
    assert state["metrics"]  # the epoch's running loss/accuracy sums
    assert store.epochs(rid)["epoch"].tolist() == [0]
    stopped_at = state["step"]

    served.clear()
    rid2 = train(cfg, store, run_id=rid, resume=True)
    assert rid2 == rid and store.get_run(rid)["status"] == "completed", store.get_run(rid)["error"]
    assert served[0] == (1, stopped_at)  # the first batch after the resume is the one after the cancel
    assert (1, stopped_at - 1) not in served
    state = json.loads((folder / "state.json").read_text())
    assert_ledger_complete(state, 3, steps)
    assert_history_clean(store, rid, 3)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["batches_trained"] == 3 * steps and summary["epochs_trained"] == 3
    assert f"resuming at epoch 2, step {stopped_at + 1}" in (folder / "train.log").read_text()
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["e003-s00000.keras"]  # old ones removed


def test_resume_extends_a_completed_run_and_refuses_other_changes(synth_small, tmp_path):
    from training.cli import main

    store = RunStore(tmp_path)
    rid = train(tiny(synth_small, tmp_path, epochs=2), store)
    assert store.get_run(rid)["status"] == "completed"
    with pytest.raises(ValueError, match="already completed"):
        jobs.resume(rid, store)
    assert main(["run", "--resume", rid, "--epochs", "4", "--learning-rate", "0.1", "--image-size", "48",
                 "--runs-dir", str(tmp_path)]) == 2  # refused, naming what changed
    assert store.get_run(rid)["config"]["epochs"] == 2
    assert main(["run", "--resume", rid, "--epochs", "4", "--runs-dir", str(tmp_path)]) == 0
    run = store.get_run(rid)
    assert run["status"] == "completed" and run["config"]["epochs"] == 4 and run["epochs_planned"] == 4
    assert RunConfig.from_file(store.run_dir(rid) / "config.json").epochs == 4
    state = json.loads((store.run_dir(rid) / "state.json").read_text())
    assert_ledger_complete(state, 4, state["steps_per_epoch"])
    assert_history_clean(store, rid, 4)


def test_resume_refusal_message_names_the_flags(synth_small, tmp_path, capsys):
    from training.cli import main

    store = RunStore(tmp_path)
    rid = store.create_run(tiny(synth_small, tmp_path).resolved().to_dict())
    assert main(["run", "--resume", rid, "--learning-rate", "0.1", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "only --epochs" in err


SLOW_HOOKS = """
import time
import training.data as d
import core.image.preprocessing as p

_get, _val, _build = d.BalancedBatches.__getitem__, d.CacheBatches.__getitem__, p.CropCache.build.__func__

def slow_train(self, i):
    time.sleep(0.12)
    return _get(self, i)

def slow_val(self, i):
    time.sleep(0.4)
    return _val(self, i)

def slow_build(cls, *a, **k):
    time.sleep(2.0)
    return _build(cls, *a, **k)

d.BalancedBatches.__getitem__, d.CacheBatches.__getitem__ = slow_train, slow_val
p.CropCache.build = classmethod(slow_build)
"""


def test_chaos_sigkill_at_random_moments_then_resume_to_completion(synth_small, tmp_path, monkeypatch):
    """SIGKILL during the cache build, mid-epoch and during validation (the worker is slowed by a
    sitecustomize hook so each phase lasts long enough to be hit), each followed by a resume; the store is
    sound after every kill and the finished run has every epoch and every step exactly once."""
    import random

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(SLOW_HOOKS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(7)
    runs = tmp_path / "runs"
    store = RunStore(runs)
    epochs = 4
    rid = jobs.launch(tiny(synth_small, runs, epochs=epochs, samples_per_class=96), store)

    def phase():
        prog = store.progress(rid) or {}
        return prog.get("phase"), prog.get("epoch"), prog.get("step"), prog.get("steps")

    moments = [("cache build", lambda: phase()[0] == "preparing data"),
               ("mid-epoch", lambda: (p := phase())[0] == "train" and p[1] >= 1 and 0 < p[2] < p[3]),
               ("validation", lambda: phase()[0] == "validate")]
    for what, when in moments:
        wait_for(when, timeout=240, every=0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(store.get_run(rid)["pid"], signal.SIGKILL)
        t0 = time.time()
        run = wait_for(lambda: (r := store.get_run(rid))["status"] == "failed" and r, timeout=10)
        assert time.time() - t0 < 10 and "ended without reporting" in run["error"], what
        with sqlite3.connect(store.db_path) as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        folder = store.run_dir(rid)
        cache = runs / "cache"
        for meta in cache.glob("crops-*.json"):  # a cache is complete only when its meta file exists
            assert (cache / meta.name.replace(".json", ".npy")).is_file()
        if (folder / "state.json").exists():
            state = json.loads((folder / "state.json").read_text())
            assert zipfile.is_zipfile(folder / state["checkpoint"]), what
            assert store.epochs(rid)["epoch"].max() >= state["epoch"] - 1
        jobs.resume(rid, store)
    run = wait_for(lambda: (r := store.get_run(rid))["status"] not in ("queued", "running") and r, timeout=300)
    assert run["status"] == "completed", run["error"]
    state = json.loads((store.run_dir(rid) / "state.json").read_text())
    assert_ledger_complete(state, epochs, state["steps_per_epoch"])
    assert_history_clean(store, rid, epochs)
    assert not list(store.run_dir(rid).glob("*.tmp*"))


def test_live_worker_in_a_long_phase_stays_running(synth_small, tmp_path, monkeypatch):
    """A worker seen from another host is judged by its heartbeat alone: with the stale limit scaled down to
    1.5 s and a validation of ~4 s, the heartbeat thread keeps it running; without heartbeats the same
    worker is declared lost (so this test can fail)."""
    import training.worker as worker_mod

    monkeypatch.setenv("CNMC_STALE_AFTER_S", "1.5")
    monkeypatch.setenv("CNMC_HEARTBEAT_S", "0.2")
    original = CacheBatches.__getitem__
    slow = threading.Event()
    slow_seconds = []

    def slow_validation(self, i):
        slow.set()
        time.sleep(0.5)
        slow_seconds.append(0.5)
        return original(self, i)

    monkeypatch.setattr(CacheBatches, "__getitem__", slow_validation)

    def run_with(heartbeat_every):
        monkeypatch.setattr(worker_mod.Heartbeat, "__init__", _heartbeat_init(heartbeat_every))
        store = RunStore(tmp_path / f"runs-{heartbeat_every}")
        cfg = tiny(synth_small, store.root, epochs=1, samples_per_class=32, batch_size=8)
        rid = store.create_run(cfg.resolved().to_dict())
        slow.clear()
        slow_seconds.clear()
        worker = threading.Thread(target=train, args=(cfg, store, rid))
        worker.start()
        wait_for(slow.is_set, timeout=120)
        with sqlite3.connect(store.db_path) as con:  # as if the worker ran on another machine
            con.execute("UPDATE runs SET host='elsewhere' WHERE id=?", (rid,))
        seen = []
        while worker.is_alive():
            seen.append(store.get_run(rid)["status"])
            time.sleep(0.1)
        worker.join()
        assert sum(slow_seconds) > 2 * 1.5  # the slow phase outlasted the (scaled-down) stale limit
        return set(seen)

    seen = run_with(0.2)
    assert "failed" not in seen and "running" in seen
    seen = run_with(3600.0)  # heartbeat thread silent: the same long phase gets the worker declared lost
    assert "failed" in seen


def _heartbeat_init(every):
    from training.worker import Heartbeat

    original = getattr(Heartbeat.__init__, "original", Heartbeat.__init__)

    def init(self, store, run_id, every_=None, stop=None):
        original(self, store, run_id, every, stop)

    init.original = original
    return init


def test_sigkilled_worker_is_failed_at_the_next_read(synth_small, tmp_path):
    store = RunStore(tmp_path)
    rid = jobs.launch(tiny(synth_small, tmp_path, epochs=30), store)
    wait_for(lambda: store.progress(rid) and store.progress(rid)["step"] > 0, every=0.05)
    os.kill(store.get_run(rid)["pid"], signal.SIGKILL)
    time.sleep(0.5)  # the kernel reaps it; no heartbeat timeout is waited for
    run = store.get_run(rid)
    assert run["status"] == "failed" and "ended without reporting" in run["error"]


def test_recycled_pid_is_not_mistaken_for_the_worker(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create_run({"architecture": "solution_a"})
    store.claim(rid)  # this process, alive
    assert store.get_run(rid)["status"] == "queued"
    with sqlite3.connect(store.db_path) as con:  # same pid, another start time: a different process
        con.execute("UPDATE runs SET pid_start='1' WHERE id=?", (rid,))
    assert store.get_run(rid)["status"] == "failed"


def test_one_job_per_device_across_run_folders(synth_small, tmp_path):
    a_store, b_store = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    a = jobs.launch(tiny(synth_small, a_store.root, epochs=2), a_store)
    b = jobs.launch(tiny(synth_small, b_store.root, epochs=2), b_store)
    runs = [wait_for(lambda s=s, r=r: (x := s.get_run(r))["status"] not in ("queued", "running") and x, timeout=300)
            for s, r in ((a_store, a), (b_store, b))]
    assert [r["status"] for r in runs] == ["completed", "completed"], [r["error"] for r in runs]
    first, second = sorted(runs, key=lambda r: r["started_at"])
    assert second["started_at"] >= first["finished_at"] - 0.5  # never both running
    logs = [(s.run_dir(r) / "train.log").read_text() for s, r in ((a_store, a), (b_store, b))]
    assert any("device busy with another run" in text for text in logs)


def test_moved_dataset_evaluation_and_misclassified_page(synth_small, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from core.data.splits import load_split
    from dashboard import services
    from training.cli import main
    from training.evaluate import evaluate

    data = tmp_path / "data" / "cells"
    shutil.copytree(synth_small, data)
    runs = tmp_path / "runs"
    store = RunStore(runs)
    rid = train(tiny(data, runs, epochs=2), store)
    assert store.get_run(rid)["status"] == "completed"
    raw = pd.read_csv(store.run_dir(rid) / "split.csv")
    assert not raw["path"].str.startswith("/").any() and raw["root"].nunique() == 1  # relative + root
    moved = tmp_path / "elsewhere" / "cells-moved"
    moved.parent.mkdir()
    shutil.move(str(data), moved)

    assert main(["evaluate", rid, "--tta", "--runs-dir", str(runs)]) == 2  # cells gone: a clear error
    result = evaluate(store, [rid], tta=True, data_root=str(moved), n_boot=50)
    assert result["provenance"]["data_dir"] == str(moved) and result["metrics"]["weighted_f1"] >= 0
    split = load_split(store.run_dir(rid) / "split.csv", data_root=moved)
    assert all(os.path.isfile(p) for p in split["path"])
    assert main(["evaluate", rid, "--tta", "--data-root", str(moved), "--runs-dir", str(runs), "--n-boot", "20"]) == 0

    table = services.errors(runs, rid, candidates=[tmp_path / "elsewhere"])
    assert len(table) and not table["missing"].any()
    assert all(str(p).startswith(str(moved)) for p in table["path"])
    gone = table["path"].iloc[0]
    os.remove(gone)

    monkeypatch.setenv("CNMC_RUNS_DIR", str(runs))
    monkeypatch.setenv("CNMC_DATA_ROOTS", str(tmp_path / "elsewhere"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "pages" / "misclassified.py"),
                           default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("missing from disk" in w.value for w in at.warning)
    assert any("**missing**" in m.value for m in at.markdown)
    assert any(b.label == "Enlarge" for b in at.button)  # the other cells are still drawn


def test_process_shards_put_together_are_the_one_process_batches():
    """Multi-process data parallelism (JAX): each process feeds its slice of every global batch; the slices of
    n processes together are exactly the cells and labels one process would train on, and validation splits
    into equal slices (dropping the last n - 1 rows at most)."""
    images = np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1).repeat(3, -1)
    pools = [np.arange(0, 12), np.arange(12, 30)]
    whole = BalancedBatches(images, pools, per_class=16, batch_size=8, seed=3, epochs=2)
    parts = [BalancedBatches(images, pools, per_class=16, batch_size=8, seed=3, epochs=2, shard=(i, 2))
             for i in range(2)]
    assert len(parts[0]) == len(whole) == 8
    for b in range(len(whole)):
        x, y = whole[b]
        xs = [p[b] for p in parts]
        assert all(len(px) == 4 for px, _ in xs)
        got = sorted(zip(np.concatenate([px for px, _ in xs])[:, 0, 0, 0], np.concatenate([py for _, py in xs])[:, 1]))
        assert got == sorted(zip(x[:, 0, 0, 0], y[:, 1]))
    val = [CacheBatches(images, np.arange(11), np.arange(11) % 2, batch_size=4, shard=(i, 2)) for i in range(2)]
    seen = [np.concatenate([v[b][0][:, 0, 0, 0] for b in range(len(v))]) for v in val]
    assert [len(s) for s in seen] == [5, 5] and sorted(np.concatenate(seen)) == list(range(10))
    labels = np.concatenate([val[0][b][1][:, 1] for b in range(len(val[0]))])
    np.testing.assert_array_equal(labels, seen[0] % 2)
    with pytest.raises(ValueError, match="split evenly"):
        BalancedBatches(images, pools, per_class=16, batch_size=7, shard=(0, 2))
