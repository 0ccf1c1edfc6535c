"""Small dashboard pieces without a running app: chart layout and the Train page's progress text."""
import pandas as pd

from dashboard import charts, services
from training.store import RunStore


def test_training_curves_legend_sits_clear_of_the_axis_titles():
    epochs = pd.DataFrame({"epoch": [0, 1], "accuracy": [0.6, 0.7], "val_accuracy": [0.5, 0.6], "loss": [1.0, 0.8],
                           "val_loss": [1.1, 0.9], "learning_rate": [1e-3, 5e-4]})
    fig = charts.training_curves(epochs)
    assert fig.layout.legend.orientation == "h"
    assert fig.layout.legend.yanchor == "bottom" and fig.layout.legend.y > 1  # above the plots, not on "epoch"
    assert [fig.layout[f"xaxis{i}"].title.text for i in ("", "2", "3")] == ["epoch"] * 3


def test_progress_text_of_finished_runs_says_how_they_ended(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create_run({"architecture": "solution_a", "epochs": 8})
    store.claim(rid)
    store.start(rid, "CPU")
    for e in range(8):
        store.log_epoch(rid, e, {"loss": 1.0}, 1.0)
    store.set_progress(rid, 8, 0, 0, phase="predicting")
    assert services.progress_info(store, rid)["text"].startswith("running: epoch 8/8, predicting")
    store.finish(rid, "completed")
    info = services.progress_info(store, rid)
    assert info["text"] == "completed: 8 of 8 epochs trained" and info["fraction"] == 1.0

    other = store.create_run({"architecture": "solution_a", "epochs": 8})
    store.claim(other)
    store.start(other, "CPU")
    store.log_epoch(other, 0, {"loss": 1.0}, 1.0)
    store.set_progress(other, 1, 5, 12)
    store.finish(other, "cancelled", "cancelled: SIGTERM")
    text = services.progress_info(store, other)["text"]
    assert text == "cancelled: 1 of 8 epochs trained (stopped at step 5/12 of epoch 2, checkpoint kept)"


def test_the_model_for_a_fields_cells_is_one_rule(tmp_path, monkeypatch):
    """Single cells keep the chosen model; a smear field's cells go to the shipped smear model when it is
    installed and wanted, else to the chosen model, and the note says which and why."""
    import core.decide.model_folder as mf

    chosen = services.ModelBundle([], None, 32, "chosen model", model_sha256="0")
    smear = services.ModelBundle([], None, 32, "shipped smear model s", model_sha256="1")
    monkeypatch.setattr(mf, "SMEAR_DIR", tmp_path / "absent")
    bundle, note = services.field_model(chosen, lambda: smear)
    assert bundle is chosen and "no shipped smear model is installed" in note
    (tmp_path / "smear").mkdir()
    (tmp_path / "smear" / "model.keras").write_bytes(b"")
    monkeypatch.setattr(mf, "SMEAR_DIR", tmp_path / "smear")
    bundle, note = services.field_model(chosen, lambda: smear)
    assert bundle is smear and "judged by shipped smear model s" in note and "single cells by chosen model" in note
    bundle, note = services.field_model(chosen, lambda: smear, use_smear=False)
    assert bundle is chosen and "switched off" in note

    def broken():
        raise ValueError("cannot be loaded")

    bundle, note = services.field_model(chosen, broken)
    assert bundle is chosen and "could not be loaded (cannot be loaded)" in note
