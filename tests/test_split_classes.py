"""A real run's split and figures mean what they say (issue 22 item 6): subject-disjoint splits hold both classes
where the subjects allow it, say plainly where they cannot, and a one-class test split gives no headline score."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.splits import SPLITS, make_split, split_counts, split_warnings, subject_overlap


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
