import pandas as pd
import pytest

from core.data.dataset import index
from core.data.splits import load_split, make_split, official_cv, save_split, split_counts, subject_overlap


@pytest.fixture(scope="module")
def replica_manifest(replica_small):
    m, p = index(replica_small)
    assert p.empty
    return m


@pytest.mark.parametrize("strategy", ["patient", "official"])
def test_sound_splits_have_zero_subject_overlap_on_replica(replica_manifest, strategy):
    split = make_split(replica_manifest, strategy, seed=4)
    assert all(len(v) == 0 for v in subject_overlap(split).values())
    assert set(split["split"]) == {"train", "val", "test"}
    assert split["label"].notna().all()
    assert split.attrs["leaks_subjects"] is False


def test_patient_split_ratio_and_stratification(replica_manifest):
    split = make_split(replica_manifest, "patient", seed=0)
    frac = split["split"].value_counts(normalize=True)
    assert 0.45 < frac["train"] < 0.75 and 0.18 < frac["val"] < 0.42 and 0.03 < frac["test"] < 0.2
    counts = split_counts(split)
    assert (counts[["subjects_all", "subjects_hem"]] > 0).all().all()  # both classes in every split
    assert len(split) == replica_manifest["label"].notna().sum()  # every labelled cell placed


def test_official_split_uses_folds_and_prelim(replica_manifest):
    split = make_split(replica_manifest, "official", val_fold=1)
    by = split.groupby("split")["source"].unique().map(set).to_dict()
    assert by == {"train": {"fold_0", "fold_2"}, "val": {"fold_1"}, "test": {"prelim"}}
    cv = official_cv(replica_manifest)
    assert [set(s.loc[s["split"] == "val", "source"]) for s in cv] == [{"fold_0"}, {"fold_1"}, {"fold_2"}]


def test_image_split_is_labelled_leaky(replica_manifest):
    split = make_split(replica_manifest, "image", seed=0)
    assert split.attrs["leaks_subjects"] and "leak" in split.attrs["note"]
    assert any(len(v) for v in subject_overlap(split).values())
    frac = split["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.6) < 0.02 and abs(frac["test"] - 0.1) < 0.02


@pytest.mark.parametrize("strategy", ["patient", "image"])
def test_split_deterministic_by_seed(replica_manifest, strategy):
    a = make_split(replica_manifest, strategy, seed=7)
    b = make_split(replica_manifest, strategy, seed=7)
    c = make_split(replica_manifest, strategy, seed=8)
    assert a.equals(b)
    assert not a["split"].equals(c["split"])


def test_split_csv_roundtrip(replica_manifest, tmp_path):
    split = make_split(replica_manifest, "official")
    path = save_split(split, tmp_path / "split.csv")
    again = load_split(path)
    pd.testing.assert_frame_equal(again, split)


def test_patient_split_refuses_too_few_subjects(replica_manifest):
    tiny = replica_manifest[replica_manifest["subject"].isin(["1", "2", "H1"])]
    with pytest.raises(ValueError, match="patient split needs"):
        make_split(tiny, "patient")


def test_unknown_strategy(replica_manifest):
    with pytest.raises(ValueError, match="unknown split strategy"):
        make_split(replica_manifest, "random")


def test_subject_folds_hold_unseen_subjects_of_both_classes(replica_manifest):
    from core.data.splits import subject_folds

    folds = subject_folds(replica_manifest, 3)
    assert folds.attrs["n_folds"] == 3 and sorted(folds["fold"].unique()) == [0, 1, 2]
    assert folds.groupby("subject")["fold"].nunique().max() == 1  # a subject never spans folds
    assert (folds.groupby("fold")["label"].nunique() == 2).all()  # both classes in every test fold
    assert len(folds) == replica_manifest["label"].notna().sum()
    again = subject_folds(replica_manifest.sample(frac=1, random_state=3), 3)  # order does not matter
    assert again.set_index("path")["fold"].sort_index().equals(folds.set_index("path")["fold"].sort_index())
    cells = folds.groupby(["label", "fold"]).size().unstack()
    assert (cells.max(axis=1) / cells.min(axis=1)).max() < 2.0  # cells of each class spread over the folds


def _toy(subjects):
    rows = [{"path": f"{s}_{i}", "label": lab, "subject": s} for s, lab, n in subjects for i in range(n)]
    return pd.DataFrame(rows)


def test_subject_folds_capped_by_smallest_class_and_greedy_balanced():
    from core.data.splits import subject_folds

    m = _toy([("H1", "hem", 5), ("H2", "hem", 3), ("1", "all", 9), ("2", "all", 4), ("3", "all", 4)])
    f = subject_folds(m, 5)
    assert f.attrs["n_folds"] == 2  # two normal subjects: two folds
    fold = f.groupby("subject")["fold"].first().to_dict()
    # largest first to the lightest fold: 1 -> 0, then 2 -> 1, then 3 -> 1 (load 4 < 9); H1 -> 0, H2 -> 1
    assert fold == {"1": 0, "2": 1, "3": 1, "H1": 0, "H2": 1}


@pytest.mark.parametrize("subjects, message", [
    ([("1", "all", 3), ("2", "all", 3)], "only one class"),
    ([("1", "all", 3), ("H1", "hem", 3)], "at least 2 subjects per class"),
])
def test_subject_folds_refuse_what_cannot_be_cross_validated(subjects, message):
    from core.data.splits import subject_folds

    with pytest.raises(ValueError, match=message):
        subject_folds(_toy(subjects), 3)
    m = _toy([("1", "all", 2), ("2", "all", 2), ("H1", "hem", 2), ("H2", "hem", 2)])
    m.loc[0, "subject"] = None
    with pytest.raises(ValueError, match="no subject id"):
        subject_folds(m, 3)


def test_split_all_puts_every_labelled_cell_in_train(replica_manifest):
    split = make_split(replica_manifest, "all")
    assert set(split["split"]) == {"train"} and len(split) == replica_manifest["label"].notna().sum()
