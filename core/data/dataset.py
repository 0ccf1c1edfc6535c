"""C-NMC 2019 dataset discovery: layouts, `UID_…` names, subject ids and a problems table.

`index(root)` walks any of the layouts the dataset ships in (Kaggle, original challenge/TCIA, plain class
folders, unlabelled folders), with `root` at any level, and returns one manifest row per usable cell plus a
problems table: nothing is dropped silently and nothing crashes on a bad file.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from core.data.imageio import bmp24_header
from core.data.labels import CLASSES

IMAGE_EXTENSIONS = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
MANIFEST_COLUMNS = ["path", "name", "label", "subject", "image", "cell", "source", "original_name",
                    "size", "mtime_ns"]
PROBLEM_COLUMNS = ["path", "source", "reason"]

_UID = re.compile(r"^UID_(?P<h>[Hh]?)(?P<num>\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<cls>all|hem)(?:\.\w+)?$",
                  re.IGNORECASE)
_FOLD = re.compile(r"^fold_(\d+)$", re.IGNORECASE)


class CellName(NamedTuple):
    subject: str
    image: int
    cell: int
    label: str


def parse_uid(name: str) -> CellName | None:
    """Parse `UID_<P>_<N>_<C>_<class>.bmp`; healthy subjects are `H<n>` whatever the case of the `h`.

    Returns None for names that do not follow the challenge convention (renamed or custom files).
    """
    m = _UID.match(os.path.basename(name))
    if not m:
        return None
    subject = ("H" if m["h"] else "") + str(int(m["num"]))
    return CellName(subject, int(m["image"]), int(m["cell"]), m["cls"].lower())


class IndexResult(NamedTuple):
    manifest: pd.DataFrame
    problems: pd.DataFrame


# ----------------------------------------------------------------------------------------------------------
# Role of a file from its path
def _role(path: Path) -> tuple[str, str | None]:
    """(source, folder label) of an image from the folders above it, independent of where the walk began."""
    parent = path.parent.name
    low = parent.lower()
    if low in CLASSES:
        fold = _FOLD.match(path.parent.parent.name)
        return (f"fold_{int(fold.group(1))}" if fold else "custom"), low
    if "prelim" in low:
        return "prelim", None
    if "final" in low and "c-nmc" in low:
        return "final", None
    return "custom", None


def _find_labels_csv(folder: Path) -> Path | None:
    """The prelim label CSV sits beside the prelim folder (Kaggle, TCIA) or, in some copies, inside it."""
    for where in (folder.parent, folder):
        hits = sorted(p for p in where.glob("*.csv") if "label" in p.name.lower())
        if hits:
            return hits[0]
    return None


# ----------------------------------------------------------------------------------------------------------
# Per-file checks
SUPPORTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                   "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_SAMPLES, _CHUNK = 8, 2048


def probe_file(path: str | os.PathLike, size: int) -> tuple[str | None, str | None]:
    """Cheap integrity check and sampled content digest of one image file: (problem reason, digest).

    A plain 24-bit BMP (all of C-NMC) is checked from its header alone: declared pixel array against the
    file size. Other files are opened (and verified) by Pillow. The digest covers the size and 8 evenly
    spread 2 KiB chunks: equal contents imply equal digests, so only colliding files need a full hash. This
    keeps indexing 15k cells to a few seconds; decode errors that slip through surface, named, when the crop
    cache is built.
    """
    if size == 0:
        return "zero-byte file", None
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, 66, 0)
        bmp = bmp24_header(head)
        if bmp is not None:
            offset, width, height, stride = bmp
            need = offset + stride * abs(height)
            if size < need:
                return f"truncated BMP: {size} bytes, header needs {need}", None
        else:
            reason = _pillow_check(path, head)
            if reason:
                return reason, None
        h = hashlib.blake2b(str(size).encode(), digest_size=16)
        if size <= _SAMPLES * _CHUNK:
            h.update(os.pread(fd, size, 0))
        else:
            for k in range(_SAMPLES):
                h.update(os.pread(fd, _CHUNK, k * (size - _CHUNK) // (_SAMPLES - 1)))
        return None, h.hexdigest()
    finally:
        os.close(fd)


def _pillow_check(path, head: bytes) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in SUPPORTED_MODES:
                return f"unsupported image mode {im.mode!r}"
            if head[:2] == b"BM":  # other BMP kinds (8-bit, RLE, OS/2): decode to be sure
                im.load()
            else:
                im.verify()  # PNG CRCs, TIFF/JPEG structure
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        return f"unreadable image: {exc}"
    return None


def full_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
def _walk_images(root: Path) -> tuple[list[Path], list[Path]]:
    """Image and other files under `root`, following symlinked folders (a dataset assembled from links, e.g.
    `all/` pointing elsewhere) but never the same real folder twice, so a link loop ends."""
    images, others = [], []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop or a second path
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def index(root: str | os.PathLike, workers: int | None = None) -> IndexResult:
    """Index a C-NMC tree (any supported layout, root at any level) into a manifest and a problems table.

    The manifest holds one row per usable image; `label` is `all`/`hem` or None for unlabelled cells (final
    phase, unlabelled folders). Every excluded file is a row of `problems` with the reason.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if root.is_file():
        raise NotADirectoryError(f"expected a dataset folder, got a file: {root}")
    images, others = _walk_images(root)
    rows: list[dict] = []
    problems: list[dict] = []

    # Non-image files inside the folders that should hold only cells are problems too (never silently skipped).
    for p in others:
        source, _ = _role(p)
        if p.suffix.lower() == ".csv":
            continue
        if source != "custom" or p.parent.name.lower() in CLASSES:
            problems.append({"path": str(p), "source": source, "reason": f"not an image file ({p.suffix or 'no extension'})"})

    # Prelim label CSVs, one per prelim folder.
    prelim_maps: dict[Path, dict[str, tuple[str, CellName | None, str]]] = {}
    for folder in sorted({p.parent for p in images if _role(p)[0] == "prelim"}):
        csv = _find_labels_csv(folder)
        prelim_maps[folder] = _read_prelim_csv(csv, problems) if csv is not None else None

    for p in images:
        source, folder_label = _role(p)
        parsed = parse_uid(p.name)
        row = {"path": str(p), "name": p.name, "label": None, "subject": None, "image": None, "cell": None,
               "source": source, "original_name": None}
        if source == "prelim":
            mapping = prelim_maps[p.parent]
            hit = mapping.pop(p.name, None) if mapping is not None else None
            if hit is None:
                reason = ("no label CSV found beside the prelim folder" if mapping is None
                          else "file has no row in the label CSV")
                problems.append({"path": str(p), "source": source, "reason": reason})
                continue
            original, cname, label = hit
            row.update(original_name=original, label=label)
            if cname is not None:
                row.update(subject=cname.subject, image=cname.image, cell=cname.cell)
        elif parsed is not None:
            row.update(subject=parsed.subject, image=parsed.image, cell=parsed.cell, label=parsed.label)
            if folder_label is not None and parsed.label != folder_label:
                problems.append({"path": str(p), "source": source,
                                 "reason": f"class suffix '{parsed.label}' disagrees with folder '{folder_label}'"})
                continue
            if source == "final":
                row["label"] = None  # final-phase cells are unlabelled even if renamed back
        else:
            row["label"] = folder_label
        rows.append(row)

    # CSV rows whose file is missing.
    for folder, mapping in prelim_maps.items():
        for new_name, (original, _, _) in sorted((mapping or {}).items()):
            problems.append({"path": str(folder / new_name), "source": "prelim",
                             "reason": f"label CSV row ({original}) has no file"})

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS[:-2])
    manifest, file_problems = _check_files(manifest, workers)
    problems.extend(file_problems)
    manifest = manifest.sort_values("path", kind="stable").reset_index(drop=True)
    for col in ("image", "cell"):
        manifest[col] = manifest[col].astype("Int64")
    manifest["size"] = manifest["size"].astype("int64")
    manifest["mtime_ns"] = manifest["mtime_ns"].astype("int64")
    problems_df = pd.DataFrame(problems, columns=PROBLEM_COLUMNS).sort_values("path", kind="stable")
    manifest.attrs.update(root=str(root), layout=detect_layout(manifest, problems_df))
    return IndexResult(manifest, problems_df.reset_index(drop=True))


def _read_prelim_csv(csv: Path, problems: list[dict]) -> dict[str, tuple[str, CellName | None, str]]:
    try:
        table = pd.read_csv(csv, dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        problems.append({"path": str(csv), "source": "prelim", "reason": f"unreadable label CSV: {exc}"})
        return {}
    need = {"Patient_ID", "new_names", "labels"}
    if not need <= set(table.columns):
        problems.append({"path": str(csv), "source": "prelim",
                         "reason": f"label CSV lacks columns {sorted(need - set(table.columns))}"})
        return {}
    out = {}
    for original, new, lab in table[["Patient_ID", "new_names", "labels"]].itertuples(index=False):
        if lab not in ("0", "1"):
            problems.append({"path": str(csv), "source": "prelim",
                             "reason": f"label CSV row {new}: label {lab!r} is not 0/1"})
            continue
        label = "all" if lab == "1" else "hem"
        cname = parse_uid(str(original))
        if cname is not None and cname.label != label:
            problems.append({"path": str(csv), "source": "prelim",
                             "reason": f"label CSV row {new}: label {label} disagrees with name {original}"})
            continue
        out[str(new)] = (str(original), cname, label)
    return out


def _check_files(manifest: pd.DataFrame, workers: int | None) -> tuple[pd.DataFrame, list[dict]]:
    """Stat, integrity-check and de-duplicate the files; returns the surviving rows and the problems."""
    paths = manifest["path"].tolist()
    workers = workers or os.cpu_count() or 1

    def one(p: str):
        try:
            st = os.stat(p)
        except OSError as exc:
            return 0, 0, f"cannot stat: {exc}", None
        try:
            reason, digest = probe_file(p, st.st_size)
        except OSError as exc:
            reason, digest = f"cannot read: {exc.strerror or exc}", None
        return st.st_size, st.st_mtime_ns, reason, digest

    batches = [paths[i:i + 128] for i in range(0, len(paths), 128)]
    with ThreadPoolExecutor(workers) as pool:  # batches: I/O overlaps without per-file thread hand-offs
        results = [r for batch in pool.map(lambda b: [one(p) for p in b], batches) for r in batch]
    manifest = manifest.copy()
    manifest["size"] = [r[0] for r in results]
    manifest["mtime_ns"] = [r[1] for r in results]
    problems = [{"path": p, "source": s, "reason": r[2]}
                for p, s, r in zip(paths, manifest["source"], results) if r[2] is not None]
    ok = np.array([r[2] is None for r in results], dtype=bool)

    # Duplicates: sampled digests group candidates, full digests confirm.
    sampled = pd.Series([r[3] for r in results], index=manifest.index)
    candidates = sampled[ok & sampled.duplicated(keep=False).to_numpy()]
    if len(candidates):
        with ThreadPoolExecutor(workers) as pool:
            full = pd.Series(list(pool.map(full_digest, manifest.loc[candidates.index, "path"])),
                             index=candidates.index)
        for _, group in full.groupby(full):
            if len(group) < 2:
                continue
            keep = manifest.loc[group.index, "path"].sort_values().index
            first = manifest.at[keep[0], "path"]
            for i in keep[1:]:
                problems.append({"path": manifest.at[i, "path"], "source": manifest.at[i, "source"],
                                 "reason": f"duplicate content of {first}"})
                ok[manifest.index.get_loc(i)] = False
    return manifest[ok], problems


def detect_layout(manifest: pd.DataFrame, problems: pd.DataFrame | None = None) -> str:
    """Name the layout(s) found, for summaries: kaggle, challenge, class_folders, unlabelled."""
    paths = pd.concat([manifest["path"], problems["path"] if problems is not None else pd.Series(dtype=str)])
    found = []
    if paths.str.contains(r"[/\\](?:training|validation|testing)_data[/\\]", regex=True).any():
        found.append("kaggle")
    if paths.str.contains(r"C-NMC_training_data|[/\\]C-NMC_test_(?:prelim|final)_phase_data[/\\][^/\\]+$",
                          regex=True).any() and "kaggle" not in found:
        found.append("challenge")
    custom = manifest[manifest["source"] == "custom"]
    if custom["label"].notna().any():
        found.append("class_folders")
    if custom["label"].isna().any():
        found.append("unlabelled")
    return "+".join(found) if found else "empty"


def summarize(result: IndexResult | tuple[pd.DataFrame, pd.DataFrame]) -> dict:
    """Machine-readable summary: counts by source and class, subjects, exclusions by reason."""
    m, p = result
    labels = m["label"].fillna("unlabelled")
    by_source = {src: {lab: int(n) for lab, n in g.value_counts().items()}
                 for src, g in labels.groupby(m["source"])}
    subjects = m.dropna(subset=["subject"]).groupby(labels)["subject"].nunique()
    reasons = p["reason"].str.replace(r" (of|\().*$", "", regex=True).value_counts()
    return {
        "root": m.attrs.get("root"), "layout": m.attrs.get("layout"), "cells": int(len(m)),
        "by_source": by_source, "by_label": {k: int(v) for k, v in labels.value_counts().items()},
        "subjects": {k: int(v) for k, v in subjects.items()},
        "excluded": int(len(p)), "excluded_by_reason": {k: int(v) for k, v in reasons.items()},
    }


def format_summary(summary: dict) -> str:
    lines = [f"root:    {summary['root']}", f"layout:  {summary['layout']}", f"cells:   {summary['cells']}"]
    for src, counts in sorted(summary["by_source"].items()):
        lines.append(f"  {src:<8} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if summary["subjects"]:
        lines.append("subjects: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["subjects"].items())))
    lines.append(f"excluded: {summary['excluded']}")
    for reason, n in summary["excluded_by_reason"].items():
        lines.append(f"  {n:>6}  {reason}")
    return "\n".join(lines)
