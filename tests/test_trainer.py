"""End-to-end trainer, worker and run-store behaviour on small synthetic data (32-px crops)."""
import json
import os
import signal
import sqlite3
import time

import pandas as pd
import pytest

pytest.importorskip("keras")

from training import jobs  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.store import RunStore  # noqa: E402
from training.trainer import train  # noqa: E402

pytestmark = pytest.mark.slow


def tiny(data, runs, **kw) -> RunConfig:
    base = dict(architecture="solution_a", data_dir=str(data), runs_dir=str(runs), cache_dir=str(runs / "cache"),
                image_size=32, batch_size=16, epochs=2, samples_per_class=32, learning_rate=1e-3,
                early_stopping=False, loader_workers=1)
    base.update(kw)
    return RunConfig(**base)


def wait_for(pred, timeout=180, every=0.3):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not reached")


def test_train_writes_a_complete_run_folder(synth_small, tmp_path):
    cfg = tiny(synth_small, tmp_path)
    store = RunStore(tmp_path)
    rid = train(cfg, store)
    run = store.get_run(rid)
    assert run["status"] == "completed", run["error"]
    assert run["device"].startswith("CPU")
    folder = store.run_dir(rid)
    for name in ("config.json", "split.csv", "best.keras", "last.keras", "history.csv", "train.log",
                 "predictions.csv", "summary.json"):
        assert (folder / name).is_file(), name
    assert RunConfig.from_file(folder / "config.json") == cfg.resolved()  # reproducible from its folder
    epochs = store.epochs(rid)
    assert epochs["epoch"].tolist() == [0, 1] and epochs["learning_rate"].notna().all()
    assert len(pd.read_csv(folder / "history.csv")) == 2
    preds = pd.read_csv(folder / "predictions.csv")
    assert {"path", "subject", "label", "prob_all", "split"} <= set(preds.columns)
    assert set(preds["split"]) == {"val", "test"} and preds["prob_all"].between(0, 1).all()
    split = pd.read_csv(folder / "split.csv")
    assert len(preds) == (split["split"] != "train").sum()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["split"] == "patient" and "test_accuracy" in summary
    # every run ends calibrated and gated, fitted on its own validation split
    from core.calibration import DecisionRule
    from core.gate import Gate

    rule = DecisionRule.load(folder / "calibration.json")
    n_val = int((split["split"] == "val").sum())
    assert rule.fitted_on.startswith(f"validation split ({n_val} cells") and rule.temperature > 0
    gate = Gate.load(folder / "gate.json")
    assert gate.novelty is not None and gate.novelty.threshold > 0
    assert gate.false_rejection["cells"] == n_val and 0 <= gate.false_rejection["novelty_rejected"] <= 0.2


def test_report_protocol_augmented_validation_is_labelled(synth_small, tmp_path):
    store = RunStore(tmp_path)
    rid = train(tiny(synth_small, tmp_path, split="image", val_augmented=True, val_samples_per_class=24,
                     epochs=1), store)
    assert store.get_run(rid)["status"] == "completed", store.get_run(rid)["error"]
    log = (store.run_dir(rid) / "train.log").read_text()
    assert "validation set is augmented" in log and "optimistic" in log
    assert "leaks subjects" in log  # the image-level split says so too


def test_exception_marks_run_failed_with_traceback(tmp_path):
    store = RunStore(tmp_path)
    rid = train(tiny(tmp_path / "missing", tmp_path), store)
    run = store.get_run(rid)
    assert run["status"] == "failed"
    assert "Traceback" in run["error"] and "dataset folder not found" in run["error"]


def test_cancel_then_resume_from_checkpoint(synth_small, tmp_path):
    store = RunStore(tmp_path)
    rid = jobs.launch(tiny(synth_small, tmp_path, epochs=5, samples_per_class=96), store)
    wait_for(lambda: len(store.epochs(rid)) >= 1)
    assert jobs.cancel(rid, store)
    run = wait_for(lambda: (r := store.get_run(rid))["status"] not in ("queued", "running") and r)
    assert run["status"] == "cancelled", run["error"]
    folder = store.run_dir(rid)
    assert (folder / "last.keras").is_file()
    done = json.loads((folder / "state.json").read_text())["epoch"]
    assert 1 <= done < 5
    jobs.resume(rid, store)
    run = wait_for(lambda: (r := store.get_run(rid))["status"] not in ("queued", "running") and r, timeout=300)
    assert run["status"] == "completed", run["error"]
    assert store.epochs(rid)["epoch"].tolist() == list(range(5))  # continued, nothing repeated or lost
    assert "resuming from epoch" in (folder / "train.log").read_text()


def test_sigkill_leaves_a_failed_run_and_a_sound_database(synth_small, tmp_path):
    store = RunStore(tmp_path)
    rid = jobs.launch(tiny(synth_small, tmp_path, epochs=20, samples_per_class=96), store)
    wait_for(lambda: store.progress(rid) and store.progress(rid)["step"] > 0)
    os.kill(store.get_run(rid)["pid"], signal.SIGKILL)
    run = wait_for(lambda: (r := store.get_run(rid))["status"] == "failed" and r, timeout=30)
    assert "ended without reporting" in run["error"]
    with sqlite3.connect(store.db_path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_jobs_queue_on_one_device(synth_small, tmp_path):
    store = RunStore(tmp_path)
    a = jobs.launch(tiny(synth_small, tmp_path, epochs=2), store)
    b = jobs.launch(tiny(synth_small, tmp_path, epochs=2), store)
    runs = [wait_for(lambda r=r: (x := store.get_run(r))["status"] not in ("queued", "running") and x, timeout=300)
            for r in (a, b)]
    assert [r["status"] for r in runs] == ["completed", "completed"], [r["error"] for r in runs]
    first, second = sorted(runs, key=lambda r: r["started_at"])
    assert second["started_at"] >= first["finished_at"] - 0.5  # never both running


def test_demo_reaches_90_percent_on_synthetic_test_split(demo_run):
    """The demo's recipe at a smaller budget (fewer cells and epochs) on an ε = 0 synthetic set."""
    store, rid, _ = demo_run
    summary = json.loads((store.run_dir(rid) / "summary.json").read_text())
    assert summary["test_cells"] >= 20
    assert summary["test_accuracy"] >= 0.9, summary


def test_split_all_trains_every_cell_for_fixed_epochs_and_keeps_the_last(synth_small, tmp_path):
    from core.models import load_model

    store = RunStore(tmp_path)
    rid = train(tiny(synth_small, tmp_path, split="all", early_stopping=True, epochs=2, hed_sigma=0.1), store)
    run = store.get_run(rid)
    assert run["status"] == "completed", run["error"]
    folder = store.run_dir(rid)
    assert len(pd.read_csv(folder / "history.csv")) == 2  # no early stop without validation
    assert len(pd.read_csv(folder / "predictions.csv")) == 0
    split = pd.read_csv(folder / "split.csv")
    assert set(split["split"]) == {"train"}
    best, last = load_model(str(folder / "best.keras")), load_model(str(folder / "last.keras"))
    for a, b in zip(best.get_weights(), last.get_weights()):
        assert (a == b).all()  # the kept model is the last epoch's
