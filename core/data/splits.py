"""Train/validation/test splits of a manifest: `patient` (default), `official` and the report's `image`.

`patient` keeps every subject in one split (cells of one person are correlated: splitting them leaks) and
puts both classes in validation and test whenever the subjects allow it; `official` follows the challenge folds
with the prelim set as test; `image` reproduces the report's random image-level 6:3:1 and is labelled as leaking
subjects; `all` puts every labelled cell in train (a final model trained for a fixed budget whose quality was
measured by cross-validation, e.g. the shipped starter model). `split_warnings` says in plain words where a split
lacks a class and what that costs.
For cross-validation by subject see `subject_folds`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.atomic import atomic_path
from core.data.labels import CLASSES

STRATEGIES = ("patient", "official", "image", "all")
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
    elif strategy == "image":
        split = _image(m, seed, ratio)
    else:
        split = np.full(len(m), "train", dtype=object)
    m["split"] = pd.array(split, dtype="str")
    m = m[m["split"].notna()].reset_index(drop=True)[_columns(m)]
    m.attrs.update(strategy=strategy, seed=seed, val_fold=val_fold if strategy == "official" else None,
                   leaks_subjects=strategy == "image", note=LEAKY.get(strategy, ""))
    return m


def _patient(m: pd.DataFrame, seed: int, ratio) -> np.ndarray:
    """Subject-disjoint train/val/test by `StratifiedGroupKFold` over sum(ratio) folds, then made sure to hold
    both classes where the subjects allow it (`_ensure_classes`): few subjects of a class (C-NMC fold 1 has 3
    healthy donors) otherwise all land in training and leave validation and test with one class."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    groups = _groups(m)
    n_folds = sum(ratio)
    n_groups = groups.nunique()
    per_class = m.groupby("label")["subject"].nunique()
    if n_groups < n_folds or m["subject"].isna().all():
        raise ValueError(f"patient split needs at least {n_folds} subjects with subject ids "
                         f"(found {n_groups}; per class {per_class.to_dict()}); use the image split for "
                         "such tiny sets, knowing it leaks subjects")
    cls = _group_class(m, groups)
    y = (groups.map(cls) == "all").astype(int).to_numpy()  # a subject's class, so every group is one class
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(m), dtype=int)
    with warnings.catch_warnings():  # "the least populated class has only k members": handled below
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test_idx) in enumerate(cv.split(np.zeros(len(m)), y, groups)):
            fold[test_idx] = k
    names = np.array(["train"] * ratio[0] + ["val"] * ratio[1] + ["test"] * ratio[2], dtype=object)
    split = names[fold]
    where = pd.Series(split, index=groups.index).groupby(groups.to_numpy()).first().to_dict()
    where = _ensure_classes(where, cls, groups.value_counts().to_dict(), ratio)
    return groups.map(where).to_numpy(dtype=object)


def _group_class(m: pd.DataFrame, groups: pd.Series) -> dict:
    """Each subject's class: the majority label of its cells (C-NMC subjects are one class; ties: `all`)."""
    counts = pd.crosstab(groups.to_numpy(), m["label"].to_numpy())
    return {g: max(counts.columns, key=lambda c: (counts.loc[g, c], c == "all")) for g in counts.index}


def _ensure_classes(where: dict, cls: dict, cells: dict, ratio) -> dict:
    """Move whole subjects so that each class is in every split its subjects allow: with k subjects of a class,
    training, validation and test (in that order of need) get one each while k lasts (k >= 3: all three;
    k == 2: train and validation, the test split lacks the class; k == 1: training only). Among the moves that
    fill a missing place, the one that keeps the class's cells closest to the ratio is taken (ties: subject
    name); when anything moved, further single moves that bring the cells closer to the ratio without emptying a
    place follow. Deterministic; a split that already holds every class it can is returned unchanged."""
    where = dict(where)
    target = np.asarray(ratio, dtype=float) / sum(ratio)
    classes = sorted(set(cls.values()))
    load = {c: np.zeros(len(SPLITS)) for c in classes}  # cells of a class per split
    subj = {c: np.zeros(len(SPLITS), dtype=int) for c in classes}  # subjects of a class per split
    for g, c in cls.items():
        load[c][SPLITS.index(where[g])] += cells[g]
        subj[c][SPLITS.index(where[g])] += 1
    need = {c: SPLITS[:min(int(subj[c].sum()), len(SPLITS))] for c in classes}

    def cost(c, vec) -> float:  # squared distance of a class's cells per split from the ratio
        return float(((vec / vec.sum() - target) ** 2).sum())

    def gain(g, to) -> float:  # how much moving g to `to` lowers its class's distance from the ratio
        c, i, j = cls[g], SPLITS.index(where[g]), SPLITS.index(to)
        vec = load[c].copy()
        vec[i] -= cells[g]
        vec[j] += cells[g]
        return cost(c, load[c]) - cost(c, vec)

    def movable(g, to) -> bool:  # leaves every required place of g's class filled
        c, frm = cls[g], where[g]
        return frm != to and not (frm in need[c] and subj[c][SPLITS.index(frm)] <= 1)

    def move(g, to) -> None:
        c, i, j = cls[g], SPLITS.index(where[g]), SPLITS.index(to)
        load[c][i] -= cells[g]
        load[c][j] += cells[g]
        subj[c][i] -= 1
        subj[c][j] += 1
        where[g] = to

    groups = sorted(where, key=str)
    moved = False
    for c in classes:
        for s in need[c]:
            if subj[c][SPLITS.index(s)]:
                continue
            options = [g for g in groups if cls[g] == c and movable(g, s)]
            if options:
                move(min(options, key=lambda g: (-gain(g, s), str(g))), s)
                moved = True
    for _ in range(10 * len(groups) if moved else 0):  # back toward the ratio, one subject at a time
        best = min(((-gain(g, s), str(g), s, g) for g in groups for s in SPLITS if movable(g, s)),
                   key=lambda t: t[:3], default=None)
        if best is None or -best[0] <= 1e-12:
            break
        move(best[3], best[2])
    return where


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


CLASS_WORDS = {"all": "all (leukemic blast)", "hem": "hem (normal)"}
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def split_warnings(split: pd.DataFrame) -> list[str]:
    """Plain-language problems of a split: an empty split, a split with one class, a class absent from
    training; each says what it costs (undefined figures, a decision rule left at its defaults). Empty for a
    sound split. The `all` strategy (no validation, no test by design) is judged on its training split only."""
    if split.empty:
        return ["the split holds no labelled cells"]
    classes = [c for c in CLASSES[::-1] if c in set(split["label"])] or sorted(split["label"].unique())  # blasts first
    subjects = split.groupby("label")["subject"].nunique()
    out = [f"the data hold no {CLASS_WORDS.get(c, c)} cells at all: every split has one class, so sensitivity, "
           "specificity, balanced accuracy and ROC AUC are undefined everywhere"
           for c in CLASSES[::-1] if c not in classes]
    present = set(split["split"])
    expected = ["train"] if split.attrs.get("strategy") == "all" or present == {"train"} else list(SPLITS)
    for s in expected:
        part = split[split["split"] == s]
        if part.empty:
            out.append(f"the {SPLIT_WORDS[s]} split is empty")
            continue
        for c in classes:
            if (part["label"] == c).any():
                continue
            where = {o: int(split.loc[(split["split"] == o) & (split["label"] == c), "subject"].nunique())
                     for o in SPLITS if o in present}
            held = ", ".join(f"{n} in {SPLIT_WORDS[o]}" for o, n in where.items() if n)
            k = int(subjects.get(c, 0))
            why = f"the data have {k} {c} subject{'' if k == 1 else 's'}{': ' + held if held else ''}"
            if s == "train":
                cost = "the model never sees such a cell while learning"
            elif s == "val":
                cost = ("the decision rule cannot be fitted and falls back to its defaults (threshold 0.5, no "
                        "temperature), and early stopping and the learning-rate schedule watch one class only")
            else:
                rate = "specificity" if c == "hem" else "sensitivity"
                kind = "false negatives (missed blasts)" if c == "hem" else \
                    "false positives (normal cells called blasts)"
                cost = (f"its {rate}, balanced accuracy, ROC AUC and weighted F1 are undefined, and its errors can "
                        f"only be {kind}")
            out.append(f"the {SPLIT_WORDS[s]} split has no {CLASS_WORDS.get(c, c)} cells ({why}): {cost}")
    return out


_SPLIT_COLUMNS = ["path", "name", "label", "subject", "image", "cell", "source", "original_name", "split"]
_OPTIONAL = ["label_overridden"]  # present when the run was trained with label overrides


def _columns(table: pd.DataFrame) -> list[str]:
    return _SPLIT_COLUMNS + [c for c in _OPTIONAL if c in table.columns]


_DTYPES = {"path": "str", "name": "str", "label": "str", "subject": "str", "image": "Int64", "cell": "Int64",
           "source": "str", "original_name": "str", "split": "str"}


def save_split(split: pd.DataFrame, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Write a split as CSV (atomically); `load_split` reads back an identical table.

    With `root` (the dataset folder) paths are stored relative to it and the root in a `root` column, so a run
    survives its dataset being moved: `load_split(path, data_root=NEW)` finds the cells in their new place.
    """
    path = Path(path)
    table = split[_columns(split)].copy()
    if root is not None:
        root = Path(root).resolve()
        table["path"] = [_relative(p, root) for p in table["path"]]
        table["root"] = str(root)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _relative(p: str, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(root).as_posix()
    except ValueError:  # outside the dataset folder: kept absolute
        return str(p)


def split_root(path: str | os.PathLike) -> str | None:
    """The dataset folder a split was saved against (for splits saved before roots were stored: the folder
    that holds all its cells)."""
    df = pd.read_csv(path, usecols=lambda c: c in ("path", "root"), dtype="str", keep_default_na=False)
    if "root" in df.columns and len(df):
        return df["root"].iloc[0]
    if not len(df):
        return None
    return os.path.commonpath([os.path.dirname(p) for p in df["path"]]) if all(map(os.path.isabs, df["path"])) else None


def relocate(paths, stored_root: str | os.PathLike | None, data_root: str | os.PathLike | None) -> list[str]:
    """Paths of a run's cells under `data_root`: relative paths are joined to it; absolute paths under the
    `stored_root` the run was trained with are moved to it; anything else is left as it is."""
    new = Path(data_root or stored_root or "")
    old = Path(stored_root) if stored_root else None
    out = []
    for p in paths:
        p = str(p)
        if not os.path.isabs(p):
            out.append(str(new / p))
        elif old is not None and data_root is not None and Path(p).is_relative_to(old):
            out.append(str(new / Path(p).relative_to(old)))
        else:
            out.append(p)
    return out


def find_data_root(stored_root: str | None, sample: list[str], candidates) -> str | None:
    """Where a run's dataset is now: its stored root if the cells are there, else the first candidate folder
    (or a sub-folder of one, two levels deep) that holds the sample of its relative paths. None if nowhere."""
    def holds(root: Path) -> bool:
        return bool(sample) and all((root / s).is_file() for s in sample)

    if stored_root and holds(Path(stored_root)):
        return stored_root
    for cand in candidates:
        cand = Path(cand)
        if not cand.is_dir():
            continue
        level1 = [d for d in sorted(cand.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        level2 = [d for sub in level1 for d in sorted(sub.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        for root in [cand, *level1, *level2]:
            if holds(root):
                return str(root.resolve())
    return None


def load_split(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """A saved split with absolute paths: under `data_root` when given (the dataset was moved), else under
    the root it was saved with. `attrs` carry `stored_root` and `data_root`."""
    df = pd.read_csv(path, dtype=_DTYPES, keep_default_na=False, na_values=[""])
    missing = set(_SPLIT_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a split file (missing columns {sorted(missing)})")
    stored = split_root(path)
    df["path"] = relocate(df["path"], stored, data_root)
    out = df[_columns(df)].copy()
    out.attrs.update(stored_root=stored, data_root=str(data_root or stored))
    return out


def subject_folds(manifest: pd.DataFrame, n_folds: int = 3) -> pd.DataFrame:
    """Leave-subjects-out folds for cross-validation: every subject in exactly one fold and every fold holding
    subjects of both classes, so each test fold is unseen patients of both classes.

    C-NMC subjects are one class each (a patient's cells are all blasts, a healthy donor's all normal), so the
    folds are built per class: a class's subjects, largest first, each go to the fold with the fewest cells of
    that class (ties: lowest fold). Deterministic. The number of folds is capped by the class with fewest
    subjects (fold 1 of C-NMC has 3 normal subjects: 3 folds, one normal subject out each). Returns the labelled
    manifest rows with a `fold` column (0 … k-1); raises ValueError with a plain reason when it cannot.
    """
    m = labelled(manifest).reset_index(drop=True).copy()
    if m.empty:
        raise ValueError("no labelled cells: leave-subjects-out needs cells of both classes with labels")
    if m["subject"].isna().any():
        raise ValueError(f"{int(m['subject'].isna().sum())} cells have no subject id (UID_ names): "
                         "leave-subjects-out needs to know every cell's subject")
    per_class = m.groupby("label")["subject"].nunique()
    missing = set(CLASSES) - set(per_class.index)
    if missing:
        raise ValueError(f"only one class found ({', '.join(per_class.index)}); leave-subjects-out needs both "
                         f"all and hem cells (missing {', '.join(sorted(missing))})")
    k = int(min(n_folds, per_class.min()))
    if k < 2:
        raise ValueError(f"leave-subjects-out needs at least 2 subjects per class (found {per_class.to_dict()})")
    mixed = m.groupby("subject")["label"].nunique()
    if (mixed > 1).any():
        raise ValueError(f"subjects with cells of both classes: {', '.join(mixed[mixed > 1].index)}")
    fold_of: dict[str, int] = {}
    for _, part in m.groupby("label"):
        counts = part["subject"].value_counts()
        order = sorted(counts.index, key=lambda s: (-counts[s], str(s)))
        load = [0] * k
        for subj in order:
            f = min(range(k), key=lambda i: (load[i], i))
            fold_of[subj] = f
            load[f] += int(counts[subj])
    m["fold"] = m["subject"].map(fold_of).astype(int)
    m.attrs.update(strategy="leave-subjects-out", n_folds=k)
    return m
