"""The review loop: a review queue for unlabelled cells, reviewers' label decisions and label overrides."""
import json

import numpy as np
import pandas as pd
import pytest

from core.decide.inference import review_queue


def test_review_queue_puts_refused_then_least_certain_first_and_failures_last():
    t = pd.DataFrame({"path": list("abcdef"), "prob_all_calibrated": [0.9, 0.52, np.nan, 0.1, 0.45, np.nan],
                      "out_of_distribution": [False, False, True, False, False, None],
                      "error": [None, None, None, None, None, "unreadable"]})
    q = review_queue(t, threshold=0.5)
    assert q["path"].tolist() == ["c", "b", "e", "a", "d", "f"]  # a/d tie at 0.4: input order kept
    assert q["review_rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert q["review_reason"][0].startswith("out of distribution") and q["review_reason"][5] == "unreadable file"
    q = review_queue(t, threshold=0.3)  # the threshold, not 0.5, is what "uncertain" is measured against
    assert q["path"].tolist() == ["c", "e", "d", "b", "a", "f"]


def test_overrides_follow_the_latest_review_per_cell(tmp_path):
    from core.data.labels import DECISIONS
    from dashboard.services import REVIEW_DECISIONS
    from training.store import RunStore

    assert REVIEW_DECISIONS is DECISIONS  # the page offers the store's own tuple, not a copy that can drift
    offered = RunStore(tmp_path / "offered")
    for decision in REVIEW_DECISIONS:  # every choice the Review page offers is one the store records
        offered.record_review("UID_1_1_1_all.bmp", "all", decision, "ana")
    assert offered.reviews()["decision"].tolist() == list(REVIEW_DECISIONS)
    with pytest.raises(ValueError, match="decision must be one of"):
        offered.record_review("UID_1_1_1_all.bmp", "all", "looks odd", "ana")
    store = RunStore(tmp_path)
    store.record_review("UID_1_1_1_all.bmp", "all", "label is wrong", "ana", "looks normal")
    store.record_review("UID_H2_3_1_hem.bmp", "hem", "label is wrong", "ana")
    store.record_review("UID_H2_3_1_hem.bmp", "hem", "label is right", "ben", "second look")  # latest wins
    store.record_review("UID_5_2_1_all.bmp", "all", "unsure", "ben")
    with pytest.raises(ValueError, match="reviewer"):
        store.record_review("UID_5_2_1_all.bmp", "all", "label is wrong", "  ")
    with pytest.raises(ValueError, match="decision"):
        store.record_review("UID_5_2_1_all.bmp", "all", "maybe", "ana")
    reviews = RunStore(tmp_path).reviews()  # survives a restart: it is in the database
    assert len(reviews) == 4 and reviews["reviewer"].tolist() == ["ana", "ana", "ben", "ben"]
    assert reviews["at"].str.match(r"\d{4}-\d\d-\d\dT").all()
    over = store.label_overrides()
    assert over[["name", "label", "original_label", "reviewer"]].values.tolist() == [
        ["UID_1_1_1_all.bmp", "hem", "all", "ana"]]


def test_load_and_apply_overrides(tmp_path):
    from core.data.labels import apply_overrides, load_overrides

    good = tmp_path / "o.csv"
    good.write_text("name,label\nb.bmp,hem\nc.bmp,all\nzzz.bmp,all\n")
    manifest = pd.DataFrame({"name": ["a.bmp", "b.bmp", "c.bmp"], "label": ["all", "all", "all"]})
    out, changed = apply_overrides(manifest, load_overrides(good))
    assert changed == 1 and out["label"].tolist() == ["all", "hem", "all"]  # c.bmp already all: no change
    assert out["label_overridden"].tolist() == [False, True, False]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,label\nb.bmp,blast\n")
    with pytest.raises(ValueError, match="'b.bmp' has label 'blast'"):
        load_overrides(bad)
    with pytest.raises(FileNotFoundError, match="overrides file not found"):
        load_overrides(tmp_path / "none.csv")


@pytest.mark.slow
def test_relabel_on_misclassified_then_train_with_the_overrides(synth_small, tmp_path, monkeypatch):
    """A reviewer marks a misclassified cell's label wrong on the page; the export holds it; a run trained with
    it counts and marks the changed label; Evaluate scores with and without it."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from training.cli import main
    from training.config import RunConfig
    from training.evaluate import evaluate
    from training.store import RunStore
    from training.trainer import train

    runs = tmp_path / "runs"
    store = RunStore(runs)
    cfg = RunConfig(architecture="solution_a", data_dir=str(synth_small), runs_dir=str(runs),
                    cache_dir=str(runs / "cache"), image_size=32, batch_size=16, epochs=2, samples_per_class=32,
                    learning_rate=1e-3, early_stopping=False, loader_workers=1)
    rid = train(cfg, store)
    monkeypatch.setenv("CNMC_RUNS_DIR", str(runs))
    monkeypatch.setenv("CNMC_DATA_ROOTS", str(tmp_path / "none"))
    page = str(Path(__file__).resolve().parent.parent / "pages" / "misclassified.py")
    at = AppTest.from_file(page, default_timeout=120).run()
    assert not at.exception, at.exception
    at.sidebar.text_input(key="reviewer").input("Dr Ana").run()
    at.radio(key="decision-0").set_value("label is wrong").run()
    at.text_input(key="note-0").input("nucleus looks mature").run()
    at.button(key="save-0").click().run()
    assert not at.exception, at.exception
    reviews = store.reviews()
    assert len(reviews) == 1 and reviews.loc[0, "reviewer"] == "Dr Ana" and reviews.loc[0, "run_id"] == rid
    name, old = reviews.loc[0, "name"], reviews.loc[0, "original_label"]
    export = [b for b in at.get("download_button") if "label overrides" in b.label]
    assert export and "(0 corrected" in export[0].label  # drawn before the save; a rerun shows the new count
    at.run()
    assert any("(1 corrected labels" in b.label for b in at.get("download_button"))
    from dashboard.auth import LOCAL
    from dashboard.services import export_overrides

    csv = export_overrides(runs, actor=LOCAL)  # local mode: the single user has every right
    table = pd.read_csv(csv)
    assert table[["name", "label", "original_label"]].values.tolist() == [[name, "hem" if old == "all" else "all", old]]

    assert main(["run", "--data-dir", str(synth_small), "--runs-dir", str(runs), "--cache-dir", str(runs / "cache"),
                 "--image-size", "32", "--batch-size", "16", "--epochs", "1", "--samples-per-class", "16",
                 "--loader-workers", "1", "--label-overrides", str(csv)]) == 0
    second = store.list_runs()["id"].iloc[0]
    folder = store.run_dir(second)
    assert RunConfig.from_file(folder / "config.json").label_overrides == str(csv)
    split = pd.read_csv(folder / "split.csv")
    assert split["label_overridden"].sum() == 1
    assert split.loc[split["name"] == name, "label"].item() != old
    assert json.loads((folder / "summary.json").read_text())["labels_overridden"] == 1
    with_o = evaluate(store, [rid], n_boot=0, label_overrides=str(csv))
    without = evaluate(store, [rid], n_boot=0)
    assert with_o["provenance"]["label_overrides"]["labels_changed"] == 1
    assert "label_overrides" not in without["provenance"]
    assert (store.run_dir(rid) / "with_overrides" / "metrics.json").is_file()
