"""Teaching the smear model a lab's own cells from what its people verified on the Classify page.

A verifier's decision on each white cell of a smear upload lands in the run store (`RunStore.record_verification`,
append-only: the latest decision per (sample, cell name) is the cell's current one) and the cell's model input is
kept beside it (`<runs>/verified_cells/<sample>/<cell_name>`: the padded paired crop, uint8 RGB PNG, exactly what
the smear model read). Those cells are labelled as surely as any ALL-IDB centroid, so a lab's refit
(`training.smear_model.adapt`: head, decision rule, gate and field rule refitted on the base's training cells plus
the lab's, cross-validated by photo before and after) can learn from them with no photo folder to assemble:

- a verified blast is `all`, a verified normal cell `hem` (a confirmed cell keeps its pre-classified class);
- a "not a white cell" and an "unsure" cell are left out: the smear model judges white cells only (debris belongs to
  its gate, not to its normal class, and teaching it as `hem` would teach "normal" to mean "anything but a blast"),
  and an unsure cell has no label to teach. A confirmed cell the model did not judge has no class either;
- each (sample, field) is one photo, the group the cross-validation splits by (a field's cells are never both
  trained on and tested); a photo is `blasts` when it holds a verified blast, else `no_blasts`.

The result is a new model folder, a version (`models/<lab>-v<k>` by default), never an overwrite of its base.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.data.atomic import atomic_path
from training.smear import CELL_COLUMNS, PAIR_TILE, PHOTO_STATS, SMEAR_SIZE, CellSet

log = logging.getLogger(__name__)

MIN_PHOTOS = 2  # a refit cross-validates by photo: with one photo there is nothing to hold out
MIN_FOLD_CELLS = 2  # ... and each fold's lab Gaussian (the gate) needs at least this many of the lab's cells
LAB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")  # a lab names a folder and a gate component
TEACH_CLASS = {"blast": "all", "normal": "hem"}  # a verified class -> the smear model's label
COUNT_KEYS = ("cells", "blast", "normal", "not a white cell", "unsure", "no class", "crop missing", "crop unusable")


def current_verifications(runs_dir: str | Path, samples: list[str] | None = None) -> pd.DataFrame:
    """The current decision per (sample, cell_name): the latest recorded (by store id; two people may verify the
    same cell, and the last word is the cell's), with its verified class (`core.smear.verify.verified_class`)."""
    from core.smear.verify import current_decisions, verified_class
    from training.store import RunStore

    v = RunStore(runs_dir).verifications()
    if samples is not None:
        v = v[v["sample"].isin(list(samples))]
    v = current_decisions(v)
    v["verified_class"] = [verified_class({"prediction": p or None}, d) for p, d in zip(v["pre_call"], v["decision"])]
    return v


def _crop_path(runs_dir: Path, crop) -> Path | None:
    """The kept model input of a cell, inside the run store's folder only (the column is a relative path; one that
    leaves the folder is not followed)."""
    if not isinstance(crop, str) or not crop.strip():
        return None
    root = runs_dir.resolve()
    path = (root / crop).resolve()
    return path if path.is_relative_to(root) else None


def model_input(img: np.ndarray) -> np.ndarray:
    """A kept cell image as the smear network's input: the padded paired crop (`SMEAR_SIZE` square) as it is; an
    unpadded paired crop (`PAIR_TILE` x 2·`PAIR_TILE`, cell | context) padded exactly as prediction and
    `training.smear.network_inputs` pad it. Anything else is not a smear model input (ValueError)."""
    from core.image.preprocessing import crop_cell

    if img.shape == (SMEAR_SIZE, SMEAR_SIZE, 3):
        return np.ascontiguousarray(img, np.uint8)
    if img.shape == (PAIR_TILE, 2 * PAIR_TILE, 3):
        return crop_cell(np.ascontiguousarray(img, np.uint8), size=SMEAR_SIZE, margin=0)
    raise ValueError(f"a kept cell of {img.shape[1]}x{img.shape[0]} px is not a smear model input "
                     f"({SMEAR_SIZE}x{SMEAR_SIZE}, or the {2 * PAIR_TILE}x{PAIR_TILE} paired crop)")


def verified_cells(runs_dir: str | Path, samples: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """(the cells a refit can learn from, how many current decisions went where). One row per usable cell:
    sample, field, cell_name, photo (`sample/field`), label (`all` / `hem`), path (its kept model input),
    verifier, at, id. The counts say how many were verified and why the others are left out (not a white cell,
    unsure, no class, kept crop missing or unusable), so a page can say what the refit will learn from."""
    from core.smear.verify import NOT_WBC, UNSURE

    runs_dir = Path(runs_dir)
    cur = current_verifications(runs_dir, samples)
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["cells"] = int(len(cur))
    rows = []
    for r in cur.to_dict("records"):
        cls = r["verified_class"]
        if cls not in TEACH_CLASS:  # not a white cell, unsure, or a confirmed cell the model did not judge
            counts[cls if cls == NOT_WBC else (UNSURE if r["decision"] == UNSURE else "no class")] += 1
            continue
        counts[cls] += 1
        path = _crop_path(runs_dir, r["crop"])
        if path is None or not path.is_file():
            counts["crop missing"] += 1
            continue
        rows.append({"sample": r["sample"], "field": r["field"] or "", "cell_name": r["cell_name"],
                     "photo": f"{r['sample']}/{r['field'] or ''}", "label": TEACH_CLASS[cls], "path": str(path),
                     "verifier": r["verifier"], "at": r["at"], "id": int(r["id"])})
    cols = ["sample", "field", "cell_name", "photo", "label", "path", "verifier", "at", "id"]
    return pd.DataFrame(rows, columns=cols), counts


def verified_summary(runs_dir: str | Path) -> pd.DataFrame:
    """Per sample: fields, cells verified (current decisions), blasts, normals, not white cells, unsure, the cells
    a refit can learn from (a class and a kept crop), verifiers and the last decision's time: what a trainer
    checks before teaching the smear model."""
    cols = ["sample", "fields", "cells verified", "blasts", "normals", "not white cells", "unsure", "usable",
            "verifiers", "last verified"]
    cur = current_verifications(runs_dir)
    if cur.empty:
        return pd.DataFrame(columns=cols)
    usable, _ = verified_cells(runs_dir)
    n_usable = usable.groupby("sample").size()
    rows = []
    for sample, g in cur.groupby("sample", sort=False):
        rows.append({"sample": sample, "fields": int(g["field"].fillna("").nunique()), "cells verified": int(len(g)),
                     "blasts": int((g["verified_class"] == "blast").sum()),
                     "normals": int((g["verified_class"] == "normal").sum()),
                     "not white cells": int((g["verified_class"] == "not a white cell").sum()),
                     "unsure": int((g["decision"] == "unsure").sum()), "usable": int(n_usable.get(sample, 0)),
                     "verifiers": ", ".join(sorted(set(g["verifier"]))), "last verified": str(g["at"].max())})
    return pd.DataFrame(rows, columns=cols).sort_values("last verified", ascending=False).reset_index(drop=True)


def cellset_of(cells: pd.DataFrame, lab: str, model=None, progress: Callable[[str], None] | None = None,
               batch: int = 32) -> tuple[CellSet, int]:
    """(the CellSet of `verified_cells`' rows for lab `lab`, how many kept crops could not be read as a model input).

    Features: the kept PNG is already the network's input, the same padded paired crop
    `training.smear.network_inputs(..., tiles=True)` makes from a cell's tile and context at training (both pad
    `paired_crop` to `SMEAR_SIZE` with margin 0, and `paired_crop`'s tile is `collect_cells`' `crop_cell(crop,
    PAIR_TILE, 0)`), so `features_of(gap_model(model), png)` gives the features the cell had at training. One view
    (view 0) is enough: the base's training cells are kept as view 0 only (`training_cells.npz`), and a refit's
    cross-validation and gate read view 0; the dihedral views are an augmentation for labs of thousands of photos.
    `model`: a smear network whose backbone to use (the base's: the same frozen ImageNet weights; default a fresh
    one)."""
    from core.data.imageio import read_image
    from training.smear import features_of, gap_model

    keep, inputs = [], []
    for i, path in enumerate(cells["path"]):
        try:
            inputs.append(model_input(read_image(path)))
            keep.append(i)
        except (OSError, ValueError) as exc:
            log.warning("verified cell %s left out: %s", path, exc)
    bad = len(cells) - len(keep)
    cells = cells.iloc[keep].reset_index(drop=True)
    if progress:
        progress(f"{len(cells)} verified cells: reading their features")
    fm = gap_model(model)
    feats = [features_of(fm, np.stack(inputs[s:s + batch])) for s in range(0, len(inputs), batch)]
    f = np.concatenate(feats).astype(np.float16) if feats else np.zeros((0, 2560), np.float16)
    photo_blasts = cells.groupby("photo")["label"].apply(lambda s: int((s == "all").sum()))
    table = pd.DataFrame({"photo": cells["photo"], "lab": lab,
                          "photo_label": np.where(cells["photo"].map(photo_blasts) > 0, "blasts", "no_blasts"),
                          "cell": np.arange(1, len(cells) + 1), "x0": 0, "y0": 0, "x1": 0, "y1": 0, "at_border": False,
                          "annotation": np.where(cells["label"] == "all", "blast", "other"), "label": cells["label"]},
                         columns=CELL_COLUMNS)
    photos = pd.DataFrame([{"photo": p, "lab": lab, "label": "blasts" if n else "no_blasts",
                            "cells_found": int((cells["photo"] == p).sum()), "blasts": n, "blasts_found": n,
                            "rbc_diameter_px": None, "error": None} for p, n in photo_blasts.items()],
                          columns=PHOTO_STATS)
    return CellSet(table, photos, f, np.arange(len(table)), np.zeros(len(table), int)), bad


def verified_cellset(runs_dir: str | Path, lab: str = "lab", samples: list[str] | None = None,
                     progress: Callable[[str], None] | None = None, model=None) -> CellSet:
    """The verified white cells of the run store (of `samples`, or all) as a CellSet for lab `lab`, labelled by
    their current decision (blast -> `all`, normal -> `hem`; "not a white cell" and "unsure" left out, see the
    module docstring), one photo per (sample, field). Cells whose kept crop is missing or unreadable are left out
    and counted: said through `progress` and the log, and kept in `photos.attrs["verified"]`."""
    cells, counts = verified_cells(runs_dir, samples)
    cs, bad = cellset_of(cells, lab, model, progress)
    counts["crop unusable"] = bad
    say = (f"{counts['cells']} verified cells: {len(cs.table)} to learn from; left out: "
           + ", ".join(f"{counts[k]} {k}" for k in COUNT_KEYS[3:]))
    log.info(say)
    if progress:
        progress(say)
    cs.photos.attrs["verified"] = counts
    return cs


def next_version(models_dir: str | Path, lab: str) -> Path:
    """`<models_dir>/<lab>-v<k>`, k one above the highest version of `lab` there (a refit is a new version)."""
    taken = [int(m.group(1)) for p in Path(models_dir).glob(f"{lab}-v*")
             if (m := re.fullmatch(re.escape(lab) + r"-v(\d+)", p.name))]
    return Path(models_dir) / f"{lab}-v{max(taken, default=0) + 1}"


def _base_labs(base: str | Path) -> set[str]:
    """The labs whose cells the base model was fitted on (its kept training cells'; a refit's base lab included)."""
    from core.decide.model_folder import folder_of
    from training.smear_model import TRAINING_CELLS

    path = folder_of(base) / TRAINING_CELLS
    if not path.is_file():
        raise ValueError(f"base model {base}: {TRAINING_CELLS} not found; a refit needs a smear model folder made by "
                         "`python -m training smear-model` (the shipped smear model, or a refit of it)")
    with np.load(path, allow_pickle=False) as z:
        return {str(x) for x in np.unique(z["lab"])}


def refit_from_verified(base: str | Path, runs_dir: str | Path, out: str | Path | None, lab: str, n_folds: int = 5,
                        progress: Callable[[str], None] | None = print, *, models_dir: str | Path | None = None,
                        samples: list[str] | None = None, by: str = "", seed: int = 0) -> dict:
    """Refit the base smear model (a folder or `smear`) for lab `lab` on the cells verified in the run store at
    `runs_dir` (`training.smear_model.adapt`), written as a new folder: `out`, which must not exist yet, or with
    `out` None the next version `<models_dir>/<lab>-v<k>` (`models_dir` default: `core.decide.model_folder.MODELS_DIR`,
    where Classify finds smear models). Refuses (ValueError saying why) an `out` that is the base or exists, a lab
    name that is no plain name or is one of the base's labs, fewer than `MIN_PHOTOS` photos (fields) with usable
    verified cells, or no verified blast or no verified normal cell. The folder appears whole or not at all (written
    aside, then renamed). Returns the card: `adaptation` holds the lab's cross-validation by photo before and after,
    `verified` what it learned from (cells, photos, what was left out and why, verifiers, who refitted it); the
    returned dict (not the card file) also holds `folder`, where the new version was written."""
    from threadpoolctl import threadpool_limits

    import core.decide.model_folder as mf
    from training.smear_model import adapt, card_markdown

    if not LAB_NAME.fullmatch(lab or ""):
        raise ValueError(f"lab name {lab!r}: use letters, digits, '-', '_' or '.' (at most 48), starting with a "
                         "letter or digit: it names the model folder")
    models_dir = Path(models_dir) if models_dir is not None else mf.MODELS_DIR
    base_folder = mf.folder_of(base)
    if not (base_folder / mf.MODEL_FILE).is_file():
        raise ValueError(f"base model {base}: {base_folder / mf.MODEL_FILE} not found")
    if out is not None:
        out = Path(out)
        if out.resolve() == base_folder.resolve():
            raise ValueError(f"the output {out} is the base folder: a refit is a new folder (a version), never an "
                             "overwrite")
        if out.exists():
            raise ValueError(f"{out} exists: a refit is a new folder (a version); name another or leave it to pick "
                             f"the next version ({next_version(out.parent, lab).name})")
    if lab in _base_labs(base):
        raise ValueError(f"lab name {lab!r} is one of the labs the base model {base} already learned: its cells "
                         "would count twice and that lab's gate would be replaced; refit the shipped base (every "
                         "verified cell is used each time) or choose another lab name")
    cells, counts = verified_cells(runs_dir, samples)
    _check_enough(cells, counts)
    if progress:
        progress(f"loading the base model {base}")
    folder = mf.load_model_folder(base)
    cs, bad = cellset_of(cells, lab, folder.model, progress)
    counts["crop unusable"] = bad
    _check_enough(cs.table, counts)
    _check_folds(cs, n_folds, seed)

    out = _claim(out, models_dir, lab)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}-", dir=_staging_dir(out.parent)))
    try:
        # the head's fit is thousands of small matrix steps: one BLAS thread is several times faster than a pool
        # fighting over busy cores (on a loaded 2-core machine a refit took 33 s instead of 286 s)
        with threadpool_limits(1):
            card = adapt(base, cs, staging, lab, n_folds, seed,
                         reproduce=f"training.teach.refit_from_verified(base={str(base)!r}, runs_dir=<run store>, "
                                   f"lab={lab!r}) on the verifications up to id {int(cells['id'].max())}",
                         progress=progress)
        card["verified"] = {
            "from": "cells verified on the Classify page (run store `verifications`, each cell's latest decision)",
            "cells": int(len(cs.table)), "blasts": int((cs.table["label"] == "all").sum()),
            "normals": int((cs.table["label"] == "hem").sum()), "photos": int(len(cs.photos)),
            "samples": int(cells["sample"].nunique()), "left_out": {k: int(counts[k]) for k in COUNT_KEYS[3:]},
            "verifiers": sorted(set(cells["verifier"])), "last_verification_id": int(cells["id"].max()),
            "refitted_by": by}
        _write_card(staging, card, card_markdown(card) + _verified_markdown(card["verified"]))
        os.replace(staging, out)  # over the empty folder claimed: the version appears whole
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        _drop_empty(staging.parent)
    if progress:
        progress(f"refitted smear model written to {out} (a new version; the base {base} is unchanged)")
    card["folder"] = str(out)
    return card


def _check_enough(cells: pd.DataFrame, counts: dict) -> None:
    """ValueError saying what is missing when the cells cannot make a refit."""
    left = ", ".join(f"{counts[k]} {k}" for k in COUNT_KEYS[3:] if counts.get(k))
    left = f" (left out: {left})" if left else ""
    if cells.empty:
        raise ValueError("no verified white cells to learn from" + (f": {counts['cells']} verified{left}"
                         if counts["cells"] else ": verify the cells of smear uploads on the Classify page first"))
    photos = cells["photo"].nunique()
    if photos < MIN_PHOTOS:
        raise ValueError(f"the verified cells come from {photos} field(s): a refit needs at least {MIN_PHOTOS} "
                         f"(its cross-validation holds whole fields out){left}")
    labels = set(cells["label"])
    for need, words in (("all", "blast"), ("hem", "normal cell")):
        if need not in labels:
            raise ValueError(f"no verified {words} among the {len(cells)} cells to learn from: a refit needs both "
                             f"blasts and normal cells{left}")


def _check_folds(cs: CellSet, n_folds: int, seed: int) -> None:
    """ValueError when a cross-validation fold would train on fewer than `MIN_FOLD_CELLS` of the lab's cells: the
    lab's gate threshold comes from each held-out cell's distance to the other folds' cells (the same folds
    `adapt` makes)."""
    from training.smear_model import photo_folds

    fold = cs.table["photo"].map(photo_folds(cs.photos, min(n_folds, len(cs.photos)), seed))
    for k in sorted(fold.unique()):
        train = int((fold != k).sum())
        if train < MIN_FOLD_CELLS:
            raise ValueError(f"too few verified cells: {len(cs.table)} in {len(cs.photos)} fields, and holding one "
                             f"field out leaves {train} to learn from (at least {MIN_FOLD_CELLS}); verify more cells "
                             "of these fields or of more fields")


def _claim(out: Path | None, models_dir: Path, lab: str) -> Path:
    """The output folder, created empty here and now (exclusive: two refits at once never share a version)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            out.mkdir()
        except FileExistsError:
            raise ValueError(f"{out} exists: a refit is a new folder (a version)") from None
        return out
    models_dir.mkdir(parents=True, exist_ok=True)
    while True:
        out = next_version(models_dir, lab)
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue


def _staging_dir(parent: Path) -> Path:
    """Where a folder is written before it appears: one level down, so nothing listing `parent`'s model folders
    (Classify's `smear_models`) sees a half-written one."""
    d = parent / ".incoming"
    d.mkdir(exist_ok=True)
    return d


def _drop_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # another refit is writing there, or it is gone already


def _write_card(folder: Path, card: dict, markdown: str) -> None:
    for name, text in (("card.json", json.dumps(card, indent=2, default=float) + "\n"), ("card.md", markdown)):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text)


def _verified_markdown(v: dict) -> str:
    left = ", ".join(f"{n} {k}" for k, n in v["left_out"].items() if n) or "none"
    return (f"\n## Taught from verified cells\n{v['cells']} cells ({v['blasts']} blasts, {v['normals']} normal) of "
            f"{v['photos']} fields in {v['samples']} samples, verified by {', '.join(v['verifiers'])}; left out: "
            f"{left}. Refitted by {v['refitted_by'] or 'unnamed'}.\n")
