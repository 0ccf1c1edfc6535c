"""Train/validation/test splits of a manifest: `patient` (default), `official` and the report's `image`.

`patient` keeps every subject in one split (cells of one person are correlated: splitting them leaks);
`official` follows the challenge folds with the prelim set as test; `image` reproduces the report's random
image-level 6:3:1 and is labelled as leaking subjects.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

STRATEGIES = ("patient", "official", "image")
SPLITS = ("train", "val", "test")
LEAKY = {"image": "image-level split: cells of one subject fall in several splits (leaks subjects; "
                  "reproduces the report, optimistic)"}
RATIO = (6, 3, 1)  # report §5.1: train:val:test by cells


def labelled(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[manifest["label"].notna()]


def _groups(m: pd.DataFrame) -> pd.Series:
    """Subject per cell; a cell without a known subject is its own group (and counted in attrs)."""
    g = m["subject"].astype(object)
    missing = g.isna()
    return g.where(~missing, "cell:" + m["path"])


def make_split(manifest: pd.DataFrame, strategy: str = "patient", seed: int = 0, val_fold: int = 2,
               ratio: tuple[int, int, int] = RATIO) -> pd.DataFrame:
    """Assign each labelled cell to train/val/test; returns the manifest rows plus a `split` column.

    Unlabelled cells (final phase) are never part of a split. The result's `attrs` record the strategy, the
    seed and whether it leaks subjects, for the run folder and the dashboard.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown split strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    m = labelled(manifest).reset_index(drop=True).copy()
    if m.empty:
        raise ValueError("no labelled cells to split")
    if strategy == "patient":
        split = _patient(m, seed, ratio)
    elif strategy == "official":
        split = _official(m, val_fold)
    else:
        split = _image(m, seed, ratio)
    m["split"] = pd.array(split, dtype="str")
    m = m[m["split"].notna()].reset_index(drop=True)[_SPLIT_COLUMNS]
    m.attrs.update(strategy=strategy, seed=seed, val_fold=val_fold if strategy == "official" else None,
                   leaks_subjects=strategy == "image", note=LEAKY.get(strategy, ""))
    return m


def _patient(m: pd.DataFrame, seed: int, ratio) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    groups = _groups(m)
    n_folds = sum(ratio)
    n_groups = groups.nunique()
    per_class = m.groupby("label")["subject"].nunique()
    if n_groups < n_folds or (per_class < 3).any():
        raise ValueError(f"patient split needs at least {n_folds} subjects and 3 per class "
                         f"(found {n_groups}; per class {per_class.to_dict()}); use the image split for "
                         "such tiny sets, knowing it leaks subjects")
    y = (m["label"] == "all").astype(int).to_numpy()
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(m), dtype=int)
    for k, (_, test_idx) in enumerate(cv.split(np.zeros(len(m)), y, groups)):
        fold[test_idx] = k
    names = np.array(["train"] * ratio[0] + ["val"] * ratio[1] + ["test"] * ratio[2], dtype=object)
    return names[fold]


def _official(m: pd.DataFrame, val_fold: int) -> np.ndarray:
    folds = sorted(s for s in m["source"].unique() if str(s).startswith("fold_"))
    if not folds:
        raise ValueError("official split needs the challenge training folds (fold_0..fold_2)")
    if f"fold_{val_fold}" not in folds:
        raise ValueError(f"validation fold fold_{val_fold} not found (have {', '.join(folds)})")
    if not (m["source"] == "prelim").any():
        raise ValueError("official split needs the labelled prelim-phase set as test")
    out = np.full(len(m), None, dtype=object)
    src = m["source"].to_numpy()
    out[np.char.startswith(src.astype(str), "fold_")] = "train"
    out[src == f"fold_{val_fold}"] = "val"
    out[src == "prelim"] = "test"
    return out  # custom cells have no place in the official protocol and stay out (None)


def official_cv(manifest: pd.DataFrame) -> list[pd.DataFrame]:
    """The three cross-validation splits of the official protocol (each fold validates once)."""
    folds = sorted(int(s.split("_")[1]) for s in manifest["source"].unique() if str(s).startswith("fold_"))
    return [make_split(manifest, "official", val_fold=k) for k in folds]


def _image(m: pd.DataFrame, seed: int, ratio) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    total = sum(ratio)
    idx = np.arange(len(m))
    y = m["label"].to_numpy()
    strat = y if min(pd.Series(y).value_counts()) >= total else None
    rest, test = train_test_split(idx, test_size=ratio[2] / total, random_state=seed, stratify=strat)
    train, val = train_test_split(rest, test_size=ratio[1] / (ratio[0] + ratio[1]), random_state=seed,
                                  stratify=None if strat is None else y[rest])
    out = np.empty(len(m), dtype=object)
    out[train], out[val], out[test] = "train", "val", "test"
    return out


def subject_overlap(split: pd.DataFrame) -> dict[tuple[str, str], set]:
    """Subjects shared between each pair of splits (empty sets for a sound split)."""
    subj = {s: set(split.loc[split["split"] == s, "subject"].dropna()) for s in SPLITS}
    return {(a, b): subj[a] & subj[b] for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]}


def split_counts(split: pd.DataFrame) -> pd.DataFrame:
    """Cells and subjects per split and class (the report's Table 1 shape)."""
    cells = split.pivot_table(index="split", columns="label", values="path", aggfunc="count", fill_value=0)
    subjects = split.groupby(["split", "label"])["subject"].nunique().unstack(fill_value=0)
    out = cells.add_prefix("cells_").join(subjects.add_prefix("subjects_"))
    return out.reindex([s for s in SPLITS if s in out.index])


_SPLIT_COLUMNS = ["path", "name", "label", "subject", "image", "cell", "source", "original_name", "split"]
_DTYPES = {"path": "str", "name": "str", "label": "str", "subject": "str", "image": "Int64", "cell": "Int64",
           "source": "str", "original_name": "str", "split": "str"}


def save_split(split: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a split as CSV (atomically); `load_split` reads back an identical table."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    split[_SPLIT_COLUMNS].to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_split(path: str | os.PathLike) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=_DTYPES, keep_default_na=False, na_values=[""])
    missing = set(_SPLIT_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a split file (missing columns {sorted(missing)})")
    return df[_SPLIT_COLUMNS]
