"""Smear photos of any lab as one table: path, lab, photo label, split group, and where known each blast's centre.

The smear model learns from three public labs and from a lab's own photos; each source has its own layout and its
own kind of label, and this module turns every one into the same table (`PHOTO_COLUMNS`):

- **ALL-IDB1** (Labati, Piuri, Scotti, ICIP 2011): photo labels from the file names and the centre of every blast
  (`core.smear.allidb`); even-numbered photos only.
- **Aria et al.'s "Blood cells cancer (ALL)"** (Ghaderzadeh et al., Int J Intell Syst 2022; Taleqani Hospital,
  Tehran): one folder per class, `Benign` (hematogones) and `Normal` -> `no_blasts`, `Early` / `Pre` / `Pro`
  (B-ALL) -> `blasts`; even-numbered photos only. No patient ids: any split of it mixes patients.
- **BCCD** (Shenggan/BCCD_Dataset): normal donors; every white cell is a certain negative.
- **a lab's own photos** (`read_photo_labels`): sub-folders `blasts/` and `no_blasts/`, or a CSV of photo and
  label.

A photo labelled `blasts` without blast centres is a *bag*: it holds at least one blast, but which cells are
blasts is unknown (`training.smear` learns from it by multiple-instance learning). Every white cell of a
`no_blasts` photo is a negative.

The reservation rule lives here for every source (`is_reserved`): odd-numbered ALL-IDB1 and Aria photos are kept
for an independent check; a reader lists them as skipped and never opens them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

BLASTS, NO_BLASTS = "blasts", "no_blasts"
PHOTO_COLUMNS = ["photo", "path", "lab", "label", "group", "centroids"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
ARIA_CLASSES = {"benign": NO_BLASTS, "normal": NO_BLASTS, "early": BLASTS, "pre": BLASTS, "pro": BLASTS}
_ARIA_NAME = re.compile(r"^WBC(?:-(?:Benign|Malignant-(?:Early|Pre|Pro))-|_Healthy_)(?P<num>\d+)$", re.IGNORECASE)
_LABEL_WORDS = {"blasts": BLASTS, "blast": BLASTS, "all": BLASTS, "1": BLASTS, "yes": BLASTS,
                "no_blasts": NO_BLASTS, "no blasts": NO_BLASTS, "no-blasts": NO_BLASTS, "hem": NO_BLASTS,
                "normal": NO_BLASTS, "0": NO_BLASTS, "no": NO_BLASTS}


def is_reserved(lab: str, name: str | os.PathLike) -> bool:
    """Whether a photo is kept for the independent check (odd-numbered ALL-IDB1 and Aria photos): the one place
    the rule lives for every lab. Photos of other labs are never reserved."""
    stem = Path(name).stem
    if lab == "allidb":
        from core.smear.allidb import is_reserved as allidb_reserved, parse_name

        parsed = parse_name(stem)
        return parsed is not None and allidb_reserved(parsed.number)
    if lab == "aria":
        m = _ARIA_NAME.match(stem)
        return m is not None and int(m["num"]) % 2 == 1
    return False


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=PHOTO_COLUMNS)


def read_allidb(root: str | os.PathLike) -> pd.DataFrame:
    """ALL-IDB1's even photos: `blasts` (ALL patients) / `no_blasts` (healthy), with blast centres."""
    from core.smear.allidb import read_allidb1

    photos = read_allidb1(root).photos
    return _table([{"photo": f"allidb/{r.photo}", "path": str(r.path), "lab": "allidb",
                    "label": BLASTS if r.label == "all" else NO_BLASTS, "group": f"allidb/{r.photo}",
                    "centroids": True} for r in photos.itertuples()])


def read_aria(root: str | os.PathLike) -> pd.DataFrame:
    """Aria's photos laid out by `aria_even.sh` (a folder per class); odd-numbered ones are skipped unopened.
    The group is the photo itself: there are no patient ids, so a split by photo mixes patients."""
    root = Path(root)
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        label = ARIA_CLASSES.get(folder.name.lower())
        if label is None:
            continue
        for path in _images(folder):
            if is_reserved("aria", path):
                continue
            name = f"aria/{folder.name}/{path.name}"
            rows.append({"photo": name, "path": str(path), "lab": "aria", "label": label, "group": name,
                         "centroids": False})
    if not rows:
        raise FileNotFoundError(f"{root}: no Aria photos found (expected sub-folders {sorted(ARIA_CLASSES)})")
    return _table(rows)


def _bccd_images(root: Path) -> Path:
    for cand in (root / "BCCD" / "JPEGImages", root / "JPEGImages", root):
        if cand.is_dir() and any(p.suffix.lower() == ".jpg" for p in cand.iterdir()):
            return cand
    raise FileNotFoundError(f"{root}: no BCCD JPEGImages folder found")


def read_bccd(root: str | os.PathLike) -> pd.DataFrame:
    """BCCD's photos (normal donors): every photo `no_blasts`, so every white cell found is a certain negative."""
    folder = _bccd_images(Path(root))
    return _table([{"photo": f"bccd/{p.name}", "path": str(p), "lab": "bccd", "label": NO_BLASTS,
                    "group": f"bccd/{p.name}", "centroids": False} for p in _images(folder)])


def parse_label(value: object, where: str) -> str:
    """`blasts` / `no_blasts` from the words a lab may write (blasts, no_blasts, all, hem, 1, 0, ...)."""
    word = str(value).strip().lower()
    if word not in _LABEL_WORDS:
        raise ValueError(f"{where}: photo label {value!r} is neither 'blasts' nor 'no_blasts'")
    return _LABEL_WORDS[word]


def read_photo_labels(source: str | os.PathLike, lab: str | None = None) -> pd.DataFrame:
    """A lab's own photos labelled as a whole: a folder with sub-folders `blasts/` and `no_blasts/`, or a CSV
    with columns `photo` (a path, relative to the CSV's folder or absolute) and `label`. Known layouts are read
    by their own reader: an ALL-IDB root, Aria's class folders, BCCD."""
    src = Path(source)
    lab = lab or src.stem.lower()
    if src.is_file() and src.suffix.lower() == ".csv":
        return _from_csv(src, lab)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: neither a folder of photos nor a CSV of photo and label")
    subs = {p.name.lower(): p for p in src.iterdir() if p.is_dir()}
    if BLASTS in subs or NO_BLASTS in subs or "no-blasts" in subs:
        rows = []
        for name, folder in subs.items():
            if name not in (BLASTS, NO_BLASTS, "no-blasts"):
                continue
            for path in _images(folder):
                if is_reserved(lab, path):
                    continue
                photo = f"{lab}/{path.relative_to(src)}"
                rows.append({"photo": photo, "path": str(path), "lab": lab, "label": parse_label(name, str(folder)),
                             "group": photo, "centroids": False})
        if not rows:
            raise FileNotFoundError(f"{src}: no photos in blasts/ or no_blasts/")
        return _table(rows)
    if set(subs) & set(ARIA_CLASSES):
        return read_aria(src)
    try:
        return read_allidb(src)
    except (FileNotFoundError, OSError, ValueError):
        pass
    try:
        return read_bccd(src)
    except FileNotFoundError:
        pass
    raise FileNotFoundError(f"{src}: expected sub-folders blasts/ and no_blasts/ (or a CSV of photo,label)")


def _from_csv(path: Path, lab: str) -> pd.DataFrame:
    table = pd.read_csv(path)
    cols = {c.lower(): c for c in table.columns}
    if "photo" not in cols or "label" not in cols:
        raise ValueError(f"{path}: a photo-label CSV needs columns 'photo' and 'label' (has {list(table.columns)})")
    rows = []
    for i, r in enumerate(table.itertuples(index=False), start=2):
        photo = Path(str(getattr(r, cols["photo"])))
        full = photo if photo.is_absolute() else path.parent / photo
        if is_reserved(lab, full):
            continue
        if not full.is_file():
            raise FileNotFoundError(f"{path}, line {i}: {full} not found")
        name = f"{lab}/{photo}"
        rows.append({"photo": name, "path": str(full), "lab": lab,
                     "label": parse_label(getattr(r, cols["label"]), f"{path}, line {i}"), "group": name,
                     "centroids": False})
    return _table(rows)


def read_labs(allidb: str | os.PathLike | None = None, aria: str | os.PathLike | None = None,
              bccd: str | os.PathLike | None = None, photos: list[str | os.PathLike] = (),
              lab: str | None = None) -> pd.DataFrame:
    """The three public labs' photos (any of them may be left out) and labs' own photo sets (`read_photo_labels`;
    `lab` names a single one) in one table."""
    parts = [read_allidb(allidb) if allidb else None, read_aria(aria) if aria else None,
             read_bccd(bccd) if bccd else None]
    parts += [read_photo_labels(p, lab if len(photos) == 1 else None) for p in photos]
    parts = [p for p in parts if p is not None]
    return pd.concat(parts, ignore_index=True) if parts else _table([])
