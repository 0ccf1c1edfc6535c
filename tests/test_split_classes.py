"""A real run's split and figures mean what they say (issue 22 item 6): subject-disjoint splits hold both classes
where the subjects allow it, say plainly where they cannot, and a one-class test split gives no headline score."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.data.splits import SPLITS, make_split, split_counts, split_warnings, subject_overlap


def fold1_like(n_hem: int = 3, seed: int = 0) -> pd.DataFrame:
    """A manifest shaped like C-NMC training fold 1: 11 ALL patients and `n_hem` healthy donors (3 in the real
    fold), about 250 cells each (the real fold: 3,581 cells of 14 subjects)."""
    rng = np.random.default_rng(seed)
    subjects = [(str(i), "all") for i in range(1, 12)] + [(f"H{i}", "hem") for i in range(1, n_hem + 1)]
    rows = []
    for subject, label in subjects:
        for k in range(int(rng.integers(180, 330))):
            name = f"UID_{subject}_{k // 4 + 1}_{k % 4 + 1}_{label}.bmp"
            rows.append({"path": f"/data/fold_1/{label}/{name}", "name": name, "label": label, "subject": subject,
                         "image": k // 4 + 1, "cell": k % 4 + 1, "source": "fold_1", "original_name": None})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7, 42])
def test_fold1_patient_split_puts_a_donor_in_validation_and_in_test(seed):
    m = fold1_like(seed=seed)
    split = make_split(m, "patient", seed=seed)
    counts = split_counts(split)
    assert list(counts.index) == list(SPLITS)
    assert (counts[["subjects_all", "subjects_hem"]] >= 1).all().all(), counts  # both classes everywhere
    assert (counts[["cells_all", "cells_hem"]] > 0).all().all()
    assert counts["subjects_hem"].tolist() == [1, 1, 1]  # three donors: one for each split
    assert all(len(v) == 0 for v in subject_overlap(split).values())  # still subject-disjoint
    assert len(split) == len(m) and split_warnings(split) == []
    frac = split["split"].value_counts(normalize=True)
    assert frac["train"] > frac["val"] > frac["test"] > 0.05  # the ratio kept as far as whole subjects allow
    assert make_split(m, "patient", seed=seed).equals(split)  # deterministic by seed


def test_two_donors_the_warning_names_the_split_that_lacks_them():
    m = fold1_like(n_hem=2)
    split = make_split(m, "patient", seed=0)  # two donors: warned, not refused
    counts = split_counts(split)
    assert counts.loc["train", "subjects_hem"] == 1 and counts.loc["val", "subjects_hem"] == 1
    assert counts.loc["test", "subjects_hem"] == 0
    warnings = split_warnings(split)
    assert len(warnings) == 1
    assert warnings[0].startswith("the test split has no hem (normal) cells")
    assert "2 hem subjects" in warnings[0] and "specificity" in warnings[0] and "undefined" in warnings[0]


def test_one_donor_validation_and_test_both_named():
    split = make_split(fold1_like(n_hem=1), "patient", seed=0)
    warnings = split_warnings(split)
    assert [w.split(" split ")[0] for w in warnings] == ["the validation", "the test"]
    assert "decision rule cannot be fitted" in warnings[0]


def test_split_warnings_class_absent_from_training_and_empty_split():
    m = fold1_like()
    split = make_split(m, "patient", seed=0)
    moved = split.copy()
    moved.loc[(moved["label"] == "hem") & (moved["split"] == "train"), "split"] = "val"
    warnings = split_warnings(moved)
    assert len(warnings) == 1 and warnings[0].startswith("the training split has no hem (normal) cells")
    no_test = split[split["split"] != "test"]
    assert any(w == "the test split is empty" for w in split_warnings(no_test))
    assert split_warnings(make_split(m, "all")) == []  # no validation or test by design


# --- metrics of a one-class split ---------------------------------------------------------------------------------
def test_one_class_metrics_are_undefined_with_the_reason_and_give_no_headline():
    from core.decide.metrics import evaluate_predictions, headline, metric_text, report_view

    preds = pd.DataFrame({"path": [f"c{i}" for i in range(10)], "subject": ["7"] * 10, "label": ["all"] * 10,
                          "prob_all": [0.9] * 8 + [0.2, 0.3]})
    result = evaluate_predictions(preds, n_boot=20, provenance={"split": "test"})
    reason = "undefined: test split has no hem cells"
    for key in ("weighted_f1", "specificity_all", "balanced_accuracy", "roc_auc", "pr_auc"):
        assert result["undefined"][key] == reason and metric_text(result, key) == reason
    assert metric_text(result, "sensitivity_all") == "0.800"  # what one class does define stays a number
    assert "sensitivity_all" not in result["undefined"]
    assert headline(result).startswith("Weighted F1 undefined: test split has no hem cells (10 all, 0 hem cells)")
    assert result["headline"] == headline(result)
    view = report_view(result)
    assert view.loc["Hem", "f1-score"] == "undefined: no hem cells"
    assert view.loc["weighted avg", "f1-score"] == "undefined: one class only"  # not the single class's 0.889
    # a metrics.json written before `undefined` was recorded: the reason is derived from its class counts
    old = {k: v for k, v in result.items() if k not in ("undefined", "headline")}
    assert metric_text(old, "roc_auc") == reason
    both = evaluate_predictions(preds.assign(label=["all"] * 9 + ["hem"]), n_boot=0, provenance={"split": "test"})
    assert both["undefined"] == {} and headline(both).startswith("weighted F1 0.")


def _one_class_test_run(tmp_path):
    """A completed run without a model, shaped like the issue's: C-NMC fold 1 split with every donor in
    training; validation 3 ALL patients, test 1 ALL patient (146 cells, 5 of them called normal)."""
    from core.data.splits import save_split
    from training.config import RunConfig
    from training.store import RunStore

    data = tmp_path / "data" / "fold1"
    m = fold1_like()
    m["path"] = [str(data / p.lstrip("/")) for p in m["path"]]
    place = {s: "train" for s in m["subject"].unique()}
    place.update({"8": "val", "9": "val", "10": "val", "11": "test"})
    m["split"] = m["subject"].map(place)
    test = m["split"] == "test"
    m = pd.concat([m[~test], m[test].head(146)], ignore_index=True)
    runs = tmp_path / "runs"
    store = RunStore(runs)
    cfg = RunConfig(architecture="solution_a", data_dir=str(data), runs_dir=str(runs), cache_dir=str(runs / "c"))
    rid = store.create_run(cfg.to_dict())
    save_split(m, store.run_dir(rid) / "split.csv", root=data)
    held = m[m["split"] != "train"][["path", "subject", "label", "split"]].copy()
    rng = np.random.default_rng(0)
    held["prob_all"] = rng.uniform(0.6, 0.99, len(held))
    held.loc[held.index[held["split"] == "test"][:5], "prob_all"] = 0.2  # the 5 false negatives
    held.to_csv(store.run_dir(rid) / "predictions.csv", index=False)
    store.start(rid, "cpu")
    store.finish(rid, "completed")
    return runs, rid


def _texts(at) -> list[str]:
    out = []
    for kind in ("markdown", "caption", "warning", "error", "info", "success", "title", "subheader"):
        out += [str(e.value) for e in getattr(at, kind)]
    out += [f"{m.label} {m.value} {m.help or ''}" for m in at.metric]
    for df in at.dataframe:
        out += [str(v) for v in np.asarray(df.value, dtype=object).ravel()]
    return out


def test_evaluate_page_says_undefined_for_a_one_class_test_split(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    runs, rid = _one_class_test_run(tmp_path)
    monkeypatch.setenv("CNMC_RUNS_DIR", str(runs))
    monkeypatch.setenv("CNMC_DATA_ROOTS", str(tmp_path / "data"))
    pages = Path(__file__).resolve().parent.parent / "pages"
    at = AppTest.from_file(str(pages / "evaluate.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    texts = _texts(at)
    assert not [t for t in texts if re.search(r"\bnan\b", t, re.I)], "a figure shown as nan"
    shown = {m.label: m.value for m in at.metric}
    assert shown["Weighted F1 (challenge)"] == "undefined"  # no numeric headline
    assert shown["Specificity (all)"] == "undefined" and shown["ROC AUC"] == "undefined"
    assert re.fullmatch(r"\d\.\d{3}", shown["Sensitivity (all)"])  # what one class does define stays a number
    assert any("undefined: test split has no hem cells" in c.value for c in at.caption)
    assert any(e.value.startswith("Weighted F1 undefined: test split has no hem cells (146 all, 0 hem cells)")
               for e in at.error)
    assert not any(re.search(r"weighted f1\W+0\.\d", t, re.I) for t in texts)
    assert any(w.value.startswith("Split: the test split has no hem (normal) cells") for w in at.warning)
    assert any(w.value.startswith("Split: the validation split has no hem") for w in at.warning)
    assert any("fitted on none: the validation split has no hem cells" in i.value for i in at.info)

    at = AppTest.from_file(str(pages / "misclassified.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    assert any("0 false positives, 5 false negatives" in c.value for c in at.caption)
    assert any("can only be false negatives" in w.value and "holds only all cells" in w.value for w in at.warning)


def test_train_page_previews_the_split_per_class_before_launch(tmp_path, monkeypatch, synth_small):
    from pathlib import Path

    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CNMC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CNMC_DEMO_DATA", str(synth_small))
    monkeypatch.setenv("CNMC_DATA_ROOTS", str(tmp_path / "no-roots"))
    page = Path(__file__).resolve().parent.parent / "pages" / "train.py"
    at = AppTest.from_file(str(page), default_timeout=180).run()
    assert not at.exception, at.exception
    next(b for b in at.button if b.label == "Preview split").click().run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert table["split"].tolist() == ["train", "val", "test"]
    assert set(table.columns) == {"split", "subjects (all / hem)", "cells all", "cells hem"}
    assert (table["cells hem"] > 0).all() and (table["cells all"] > 0).all()
    assert not [w for w in at.warning if w.value.startswith("Split:")]  # a sound split: nothing to warn about
