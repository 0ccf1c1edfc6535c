"""End-to-end trainer, worker and run-store behaviour on small synthetic data (32-px crops)."""
import json
import os

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("keras")

from training import jobs  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.store import RunStore  # noqa: E402
from helpers import tiny, wait_for  # noqa: E402
from training.trainer import train  # noqa: E402

pytestmark = pytest.mark.slow


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
    from core.decide.calibration import DecisionRule
    from core.decide.gate import Gate

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
    assert "resuming at epoch" in (folder / "train.log").read_text()
    state = json.loads((folder / "state.json").read_text())  # SIGTERM kept every trained batch: none twice
    assert json.loads((folder / "summary.json").read_text())["batches_trained"] == 5 * state["steps_per_epoch"]


def test_demo_reaches_90_percent_on_synthetic_test_split(demo_run):
    """The demo's recipe at a smaller budget (fewer cells and epochs) on an ε = 0 synthetic set."""
    store, rid, _ = demo_run
    summary = json.loads((store.run_dir(rid) / "summary.json").read_text())
    assert summary["test_cells"] >= 20
    assert summary["test_accuracy"] >= 0.9, summary


def test_split_all_trains_every_cell_for_fixed_epochs_and_keeps_the_last(synth_small, tmp_path):
    from core.nets.models import load_model

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


def test_early_stopping_ends_a_run_that_stops_improving(synth_small, tmp_path):
    """With a learning rate too small to change anything, validation accuracy never improves: patience 1 stops
    the run after its second epoch of ten, the run completes and its checkpoint says why."""
    store = RunStore(tmp_path)
    rid = train(tiny(synth_small, tmp_path, epochs=10, early_stopping=True, es_patience=1, learning_rate=1e-12,
                     augment=False), store)
    run = store.get_run(rid)
    assert run["status"] == "completed", run["error"]
    assert store.epochs(rid)["epoch"].tolist() == [0, 1]
    state = json.loads((store.run_dir(rid) / "state.json").read_text())
    assert state["stopped_early"] is True and state["callbacks"]["EarlyStopping"]["wait"] >= 1
    assert json.loads((store.run_dir(rid) / "summary.json").read_text())["epochs_trained"] == 2


def test_crop_margin_zero_keeps_whole_images(synth_small, tmp_path):
    """For pre-cropped datasets: margin 0 trains on the whole image (resized), and the run's model is then
    applied to whole images too."""
    import numpy as np

    from core.data.imageio import read_image
    from core.image.preprocessing import CropCache, crop_cell
    from core.data.splits import load_split
    from training.evaluate import crop_margin_of

    store = RunStore(tmp_path)
    rid = train(tiny(synth_small, tmp_path, epochs=1, crop_margin=0), store)
    assert store.get_run(rid)["status"] == "completed", store.get_run(rid)["error"]
    assert RunConfig.from_file(store.run_dir(rid) / "config.json").crop_margin == 0
    assert crop_margin_of(rid, store) == 0  # predict / Classify apply the model to whole images too
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("crops-*.json")]
    assert [m["margin"] for m in metas] == [0]
    split = load_split(store.run_dir(rid) / "split.csv")
    stats = [os.stat(p) for p in split["path"]]
    cache = CropCache.build(split.assign(size=[s.st_size for s in stats], mtime_ns=[s.st_mtime_ns for s in stats]),
                            tmp_path / "cache", size=32, margin=0, progress=False)
    assert cache.reused  # the very cache the run trained on
    img = read_image(split["path"].iloc[0])
    whole = crop_cell(img, size=32, margin=0)
    assert not np.array_equal(whole, crop_cell(img, size=32))  # the default crop would have cut it
    np.testing.assert_array_equal(cache.array[cache.rows(split["path"].iloc[:1])][0], whole)


def test_every_run_writes_tensorboard_logs(synth_small, tmp_path):
    import tensorflow as tf

    store = RunStore(tmp_path)
    rid = train(tiny(synth_small, tmp_path, epochs=2), store)
    assert store.get_run(rid)["status"] == "completed", store.get_run(rid)["error"]
    logs = store.run_dir(rid) / "tensorboard"
    tags: dict[str, list] = {}
    for event_file in logs.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags.setdefault(f"{event_file.parent.name}/{value.tag}", []).append(event.step)
    assert tags["train/epoch_loss"] == [0, 1] and tags["validation/epoch_accuracy"] == [0, 1]
    assert tags["train/epoch_learning_rate"] == [0, 1]
    assert "samples/augmented training cells" in tags


def test_subject_correction_travels_from_config_to_every_call(synth_small, tmp_path):
    """RunConfig.subject_correction: the run's rule is fitted with it on its validation subjects, and predict
    (and evaluate) decide each cell with its subject's other cells of the same batch."""
    from core.decide.calibration import DecisionRule
    from core.data.splits import load_split
    from training.cli import main
    from training.evaluate import evaluate

    store = RunStore(tmp_path)
    rid = train(tiny(synth_small, tmp_path, subject_correction=0.5, epochs=1), store)
    assert store.get_run(rid)["status"] == "completed", store.get_run(rid)["error"]
    folder = store.run_dir(rid)
    rule = DecisionRule.load(folder / "calibration.json")
    assert rule.subject_weight == 0.5 and "subject correction weight 0.5" in rule.fitted_on
    split = load_split(folder / "split.csv")
    test = split[split["split"] == "test"]
    paths = test.groupby("subject").head(3)["path"].tolist()
    out = tmp_path / "pred.csv"
    assert main(["predict", rid, *paths, "--out", str(out), "--runs-dir", str(tmp_path)]) == 0
    table = pd.read_csv(out, dtype={"subject": "str"})
    judged = table["prediction"].notna().to_numpy()
    assert judged.sum() >= 4
    expected = rule.decide(table.loc[judged, "prob_all"].to_numpy(), subjects=table.loc[judged, "subject"].tolist())
    np.testing.assert_allclose(table.loc[judged, "prob_all_calibrated"], expected["prob_all_calibrated"], atol=1e-6)
    assert table.loc[judged, "subject_corrected"].astype(bool).tolist() == expected["subject_corrected"].tolist()
    assert table.loc[judged, "subject_corrected"].astype(bool).any()
    assert evaluate(store, [rid])["calibration"] is not None
    assert DecisionRule.load(folder / "calibration.json").subject_weight == 0.5  # evaluate kept the run's setting
