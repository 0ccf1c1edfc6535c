"""The class labels (`CLASSES`) and label overrides: reviewers' corrections of dataset labels, as a CSV any run
can train or be evaluated with.

A reviewer who finds a wrongly labelled cell records "label is wrong" (or "label is right", "unsure") in the run
store; the latest "label is wrong" decision per cell becomes an override: the cell's corrected label. Cells are
keyed by file name (C-NMC's UID_ names are unique), so overrides survive moving the dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from core.data.atomic import atomic_path

DECISIONS = ("label is wrong", "label is right", "unsure")
OVERRIDE_COLUMNS = ["name", "label", "original_label", "reviewer", "at", "note"]
# The two cell classes, in the order of the integer labels everywhere (data, training, models): hem = 0
# (normal), all = 1 (leukemic blast, the positive class), as in the challenge CSV; a model's output is P(all).
# The one definition: every other module imports it.
CLASSES = ("hem", "all")


def other(label: str) -> str:
    """The corrected label of a binary cell whose label is wrong."""
    if label not in CLASSES:
        raise ValueError(f"not a class label: {label!r}")
    return "hem" if label == "all" else "all"


def overrides_from_reviews(reviews: pd.DataFrame) -> pd.DataFrame:
    """One row per cell whose latest decision is "label is wrong": its corrected label (the other class)."""
    if reviews.empty:
        return pd.DataFrame(columns=OVERRIDE_COLUMNS)
    latest = reviews.sort_values("id").groupby("name", as_index=False).tail(1)
    wrong = latest[latest["decision"] == "label is wrong"]
    out = wrong.assign(label=[other(lbl) for lbl in wrong["original_label"]])
    return out[OVERRIDE_COLUMNS].sort_values("name").reset_index(drop=True)


def save_overrides(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        table[OVERRIDE_COLUMNS].to_csv(tmp, index=False)
    return path


def load_overrides(path: str | os.PathLike) -> pd.DataFrame:
    """An overrides CSV (at least `name` and `label`), checked: a clear error names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label overrides file not found: {path}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"name", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: not a label overrides file (missing columns {sorted(missing)})")
    bad = table[~table["label"].isin(CLASSES)]
    if len(bad):
        raise ValueError(f"{path}: row for {bad['name'].iloc[0]!r} has label {bad['label'].iloc[0]!r}; "
                         f"labels are {' or '.join(CLASSES[::-1])}")
    if table["name"].duplicated().any():
        raise ValueError(f"{path}: {table['name'][table['name'].duplicated()].iloc[0]!r} is listed twice")
    return table


def apply_overrides(manifest: pd.DataFrame, overrides: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The manifest with corrected labels (matched by file name) and a `label_overridden` column; returns it
    with the number of labels that changed. Overrides naming cells not in the manifest are ignored."""
    m = manifest.copy()
    new = m["name"].map(dict(zip(overrides["name"], overrides["label"])))
    changed = new.notna() & (new != m["label"])
    m.loc[changed, "label"] = new[changed]
    m["label_overridden"] = changed
    return m, int(changed.sum())
