"""ALL-IDB (Labati, Piuri, Scotti, IEEE ICIP 2011): ALL-IDB1 smear photos with their centroids, and where each
ALL-IDB2 crop was cut from.

Odd-numbered ALL-IDB1 photos are reserved for an independent check. `is_reserved` is the one place that rule
lives: `read_allidb1` lists them as problems without ever opening them, `centroids` and `map_crops_to_photos`
refuse them. ALL-IDB2 crops have their own numbering, so a crop is usable only once it has been found, pixel for
pixel, in an even photo present here (`crop_map`, cached as `ALL_IDB2/crop_to_photo.csv`). A crop found nowhere
presumably comes from a reserved photo; a crop showing the same field as an even photo but from another shot
(other exposure, focus, no drawn arrows) comes from a photo that is not here, possibly a reserved one: neither
is usable.
"""
from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd

from core.data.atomic import atomic_path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".tif", ".tiff", ".png", ".bmp"}
PHOTO_COLUMNS = ["photo", "number", "label", "path", "width", "height", "blasts", "others", "size", "mtime_ns"]
PROBLEM_COLUMNS = ["path", "reason"]
MAP_COLUMNS = ["crop", "photo", "x", "y", "score", "detail", "status", "candidate", "runner_up", "width", "height",
               "cx", "cy"]
CACHE_NAME = "crop_to_photo.csv"
# Band-pass NCC ("detail") deciding a copy. On the real data: crops cut from an even photo 1.0000 (the same crops
# re-encoded as JPEG quality 75: >= 0.9966), other shots of a field an even photo shows 0.89-0.988, the best
# place of every other crop <= 0.56.
BAND = (1.5, 6.0)
XYC_ORIGIN = 1  # .xyc coordinates count from 1 (see `centroids`)
COPY_THRESHOLD = 0.993
SAME_FIELD_THRESHOLD = 0.75
_CACHE_VERSION = "2"

_NAME = re.compile(r"^Im(?P<num>\d+)_(?P<y>[01])$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------
# Names and the reservation rule
def is_reserved(number: int) -> bool:
    """Odd-numbered ALL-IDB1 photos are kept for an independent check: never train, tune or look at them."""
    return int(number) % 2 == 1


class AllidbName(NamedTuple):
    stem: str  # "Im002_1"
    number: int
    label: str  # "all" (Y=1: ALL patient / blast at the centre) or "hem" (Y=0)


def parse_name(name: str | os.PathLike) -> AllidbName | None:
    """`ImXXX_Y[.ext]` (ALL-IDB1 photos, their .xyc files, ALL-IDB2 crops), else None."""
    stem = Path(name).stem if Path(str(name)).suffix.lower() in IMAGE_EXTENSIONS | {".xyc"} else Path(name).name
    m = _NAME.match(stem)
    if not m:
        return None
    return AllidbName(f"Im{m['num']}_{m['y']}", int(m["num"]), "all" if m["y"] == "1" else "hem")


def _child(folder: Path, name: str) -> Path | None:
    """A sub-folder by name, whatever its case (copies of ALL-IDB differ: `ALL_IDB1`, `all_idb1`, `Im`)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    if folder.is_dir():
        for c in folder.iterdir():
            if c.is_dir() and c.name.lower() == name.lower():
                return c
    return None


def find_root(path: str | os.PathLike) -> Path:
    """The folder holding `ALL_IDB1`/`ALL_IDB2`, from a path at any level (that folder, one above it, or
    `ALL_IDB1`, `ALL_IDB1/im` and the like below it), so every tool accepts whatever the user points at."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"ALL-IDB folder not found: {p}")
    for cand in (p, p.parent, p.parent.parent):
        if _child(cand, "ALL_IDB1") or _child(cand, "ALL_IDB2"):
            return cand
    for c in sorted(p.iterdir()):
        if c.is_dir() and (_child(c, "ALL_IDB1") or _child(c, "ALL_IDB2")):
            return c
    raise FileNotFoundError(f"no ALL_IDB1 or ALL_IDB2 folder at or around {p}")


def _idb1(root: Path) -> Path:
    d = _child(root, "ALL_IDB1")
    if d is None:
        raise FileNotFoundError(f"no ALL_IDB1 folder in {root}")
    return d


def _photo_folder(root: Path) -> Path:
    """`ALL_IDB1/im` as distributed; photos lying directly in `ALL_IDB1` are accepted too."""
    d = _idb1(root)
    return _child(d, "im") or d


def _xyc_path(root: Path, stem: str, kind: str) -> Path:
    """Blast centroids in `ALL_IDB1/xyc` (or next to the photo); other objects in `ALL_IDB1/other`."""
    d = _idb1(root)
    if kind == "others":
        return (_child(d, "other") or d / "other") / f"{stem}.xyc"
    sub = _child(d, "xyc")
    if sub is not None:
        return sub / f"{stem}.xyc"
    return _photo_folder(root) / f"{stem}.xyc"


# ----------------------------------------------------------------------------------------------------------
# ALL-IDB1
def read_xyc(path: str | os.PathLike) -> np.ndarray:
    """(n, 2) float array of `x y` points as written (1-based, see `centroids`), one per line, tab/space/comma
    separated; blank lines skipped (the `_0` files hold only blank lines). A malformed line raises ValueError
    naming file and line, rather than silently losing a cell."""
    pts = []
    with open(path, encoding="ascii", errors="replace") as fh:
        for k, line in enumerate(fh, 1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                pts.append((float(fields[0]), float(fields[1])))
            except ValueError:
                raise ValueError(f"{path}:{k}: expected 'x y', got {line.strip()!r}") from None
    return np.asarray(pts, np.float64).reshape(-1, 2)


class Allidb1(NamedTuple):
    photos: pd.DataFrame  # PHOTO_COLUMNS, even-numbered photos only, sorted by number
    problems: pd.DataFrame  # PROBLEM_COLUMNS: reserved photos skipped unread, bad names, unreadable files …


def read_allidb1(root: str | os.PathLike) -> Allidb1:
    """The usable (even-numbered) ALL-IDB1 photos and a problems table; odd photos are listed there, never opened.

    Each photo row carries its size in pixels (read from the header) and the number of blast and other
    centroids, so a missing or malformed annotation shows up here rather than half-way through a run.
    """
    from PIL import Image

    root = find_root(root)
    rows: list[dict] = []
    problems: list[dict] = []
    seen: dict[int, str] = {}
    for p in sorted(_photo_folder(root).iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        name = parse_name(p.name)
        if name is None:
            problems.append({"path": str(p), "reason": "name is not ImXXX_Y"})
            continue
        if is_reserved(name.number):
            problems.append({"path": str(p), "reason": "reserved odd-numbered photo: skipped, not read"})
            continue
        if name.number in seen:
            problems.append({"path": str(p),
                             "reason": f"photo number {name.number} already given by {seen[name.number]}"})
            continue
        try:
            st = p.stat()
            with Image.open(p) as im:
                width, height = im.size
        except (OSError, ValueError) as exc:
            problems.append({"path": str(p), "reason": f"unreadable image: {exc}"})
            continue
        counts = {}
        bad = None
        for kind in ("blasts", "others"):
            xyc = _xyc_path(root, name.stem, kind)
            if not xyc.is_file():
                counts[kind] = 0
                if kind == "blasts" and name.label == "all":
                    bad = f"no blast centroid file {xyc.name}"
                continue
            try:
                counts[kind] = len(read_xyc(xyc))
            except (OSError, ValueError) as exc:
                bad = f"bad centroid file: {exc}"
        if bad is None and name.label == "hem" and counts["blasts"]:
            bad = f"healthy (Y=0) photo lists {counts['blasts']} blast centroids"
        if bad is not None:
            problems.append({"path": str(p), "reason": bad})
            continue
        seen[name.number] = p.name
        rows.append({"photo": name.stem, "number": name.number, "label": name.label, "path": str(p),
                     "width": width, "height": height, "blasts": counts["blasts"], "others": counts["others"],
                     "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    photos = pd.DataFrame(rows, columns=PHOTO_COLUMNS).sort_values("number", ignore_index=True)
    return Allidb1(photos, pd.DataFrame(problems, columns=PROBLEM_COLUMNS))


def centroids(root: str | os.PathLike, photo: str | int | os.PathLike, zero_based: bool = True
              ) -> dict[str, np.ndarray]:
    """{"blasts": (n, 2), "others": (m, 2)} float (x, y) centroids of one even photo (name, number or path).

    The .xyc files count pixels from 1 (MATLAB): all 68 ALL-IDB2 blast crops copied from even photos are centred
    exactly one pixel left of and above their blast's file coordinates, and ALL-IDB-Patches reads its "other"
    file in the same frame. `zero_based` (default) subtracts 1 so points index numpy arrays directly.
    "others" are the ALL-IDB-Patches annotations (non-blast white cells, platelets, debris); absent files give
    empty arrays. A reserved (odd) photo raises ValueError: its annotations are as off-limits as its pixels.
    """
    root = find_root(root)
    if isinstance(photo, (int, np.integer)):
        number = int(photo)
        if is_reserved(number):
            raise ValueError(f"photo {number} is reserved (odd-numbered): not to be used")
        hits = sorted(p for p in _photo_folder(root).iterdir() if (n := parse_name(p.name)) and n.number == number
                      and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not hits:
            raise FileNotFoundError(f"no ALL-IDB1 photo number {number} in {root}")
        photo = hits[0].name
    name = parse_name(Path(str(photo)).name)
    if name is None:
        raise ValueError(f"not an ALL-IDB1 photo name: {photo!r}")
    if is_reserved(name.number):
        raise ValueError(f"photo {name.stem} is reserved (odd-numbered): not to be used")
    out = {}
    for kind in ("blasts", "others"):
        xyc = _xyc_path(root, name.stem, kind)
        if xyc.is_file():
            out[kind] = read_xyc(xyc) - (XYC_ORIGIN if zero_based else 0)
        elif kind == "blasts" and name.label == "all":
            raise FileNotFoundError(f"no blast centroid file for {name.stem}: {xyc}")
        else:
            out[kind] = np.zeros((0, 2))
    return out


# ----------------------------------------------------------------------------------------------------------
# ALL-IDB2 crops → ALL-IDB1 photos
def _grey(path: str | os.PathLike) -> np.ndarray:
    """Luma (ITU-R 601, Pillow's "L") as uint8: one channel carries the texture NCC needs, at a third of the cost."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _shrink(a: np.ndarray, f: int) -> np.ndarray:
    """Block mean by `f` (edges beyond a multiple of `f` dropped), float32."""
    if f == 1:
        return a.astype(np.float32)
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    return a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)


def _ncc(image: np.ndarray, template: np.ndarray) -> np.ndarray:
    """skimage's NCC map; flat windows (NaN/inf) score 0 so they never win."""
    from skimage.feature import match_template

    r = match_template(image.astype(np.float32, copy=False), template.astype(np.float32, copy=False))
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


class NccSearcher:
    """NCC maps of many templates in one image, as skimage's `match_template` (valid positions) computes them,
    but with the image's FFT and window statistics computed once: about a quarter of the time per crop on
    ALL-IDB's reduced photos. Flat windows score 0."""

    def __init__(self, image: np.ndarray):
        from scipy import fft

        img = image.astype(np.float64)
        img -= img.mean()  # smaller sums, same NCC
        self.shape = img.shape
        self._fft_shape = tuple(fft.next_fast_len(n, real=True) for n in img.shape)
        self._spectrum = fft.rfft2(img.astype(np.float32), s=self._fft_shape)
        self._c1 = np.pad(img, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        self._c2 = np.pad(img * img, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        self._window_std: dict[tuple[int, int], np.ndarray] = {}

    def _std(self, h: int, w: int) -> np.ndarray:
        """sqrt(sum of squared deviations) of every h×w window, from the integral images; cached per shape."""
        if (h, w) not in self._window_std:
            c1, c2 = self._c1, self._c2
            s1 = c1[h:, w:] - c1[:-h, w:] - c1[h:, :-w] + c1[:-h, :-w]
            s2 = c2[h:, w:] - c2[:-h, w:] - c2[h:, :-w] + c2[:-h, :-w]
            self._window_std[(h, w)] = np.sqrt(np.maximum(s2 - s1 * s1 / (h * w), 0.0))
        return self._window_std[(h, w)]

    def ncc(self, template: np.ndarray) -> np.ndarray:
        """(H - h + 1, W - w + 1) NCC map of `template` (which must fit in the image)."""
        from scipy import fft

        h, w = template.shape
        if h > self.shape[0] or w > self.shape[1]:
            raise ValueError(f"template {h}x{w} larger than image {self.shape[0]}x{self.shape[1]}")
        t = template.astype(np.float64) - float(template.mean())
        norm = float(np.sqrt((t * t).sum()))
        spectrum = fft.rfft2(t.astype(np.float32), s=self._fft_shape)
        corr = fft.irfft2(self._spectrum * spectrum.conj(), s=self._fft_shape)
        corr = corr[: self.shape[0] - h + 1, : self.shape[1] - w + 1]
        den = self._std(h, w) * norm
        out = np.zeros(corr.shape, np.float64)
        ok = den > 1e-6 * max(norm, 1.0) * np.sqrt(h * w)
        out[ok] = corr[ok] / den[ok]
        return out


def _bandpass(a: np.ndarray) -> np.ndarray:
    """Difference of Gaussians (σ 1.5 → 6 px): the cell-scale detail two shots of one field do not share, above
    the finest scale where JPEG re-encoding noise lives."""
    from scipy import ndimage as ndi

    a = a.astype(np.float32)
    return ndi.gaussian_filter(a, BAND[0]) - ndi.gaussian_filter(a, BAND[1])


def _plain_ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def _coarse(photo: str, small_crops: list[np.ndarray], factor: int) -> np.ndarray:
    """(n_crops, 3) best (score, row, col) of each reduced crop in one reduced photo (-1 when it does not fit)."""
    searcher = NccSearcher(_shrink(_grey(photo), factor))
    out = np.full((len(small_crops), 3), -1.0)
    for i, t in enumerate(small_crops):
        if t.shape[0] > searcher.shape[0] or t.shape[1] > searcher.shape[1] or min(t.shape) < 2:
            continue
        r = searcher.ncc(t)
        k = np.unravel_index(int(np.argmax(r)), r.shape)
        out[i] = (r[k], k[0], k[1])
    return out


def _fine(photo: str, jobs: list[tuple[int, np.ndarray, int, int]], radius: int
          ) -> list[tuple[int, float, float, int, int]]:
    """Full-resolution grey NCC of each crop in a ±`radius` window around its coarse position, then the
    band-pass NCC at the best position: (crop, score, detail, row, col)."""
    img = _grey(photo)
    H, W = img.shape
    res = []
    for i, crop, y0, x0 in jobs:
        h, w = crop.shape
        top, left = max(0, y0 - radius), max(0, x0 - radius)
        bottom, right = min(H, y0 + radius + h), min(W, x0 + radius + w)
        if bottom - top < h or right - left < w:
            res.append((i, -1.0, -1.0, -1, -1))
            continue
        r = _ncc(img[top:bottom, left:right], crop)
        k = np.unravel_index(int(np.argmax(r)), r.shape)
        y, x = top + int(k[0]), left + int(k[1])
        detail = _plain_ncc(_bandpass(crop), _bandpass(img[y:y + h, x:x + w]))
        res.append((i, float(r[k]), detail, y, x))
    return res


def _none_for_missing(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Name columns as object dtype holding str or None: pandas 3 would store missing names as NaN, which
    `is None` tests and truthiness get wrong."""
    for c in columns:
        table[c] = pd.Series([v if isinstance(v, str) else None for v in table[c]], index=table.index, dtype=object)
    return table


def _cell_centre(pos: int, size: int, nominal: int, extent: int) -> float:
    """Centre of the crop's nominal (square) window along one axis: a crop cut short by the photo border lost
    its outer side, so its cell sits `nominal // 2` from the side that touches the inner part of the photo."""
    if size < nominal and pos == 0:
        return float(size - nominal + nominal // 2)
    if size < nominal and pos + size == extent:
        return float(pos + nominal // 2)
    return float(pos + size // 2)


def map_crops_to_photos(crop_paths: Sequence[str | os.PathLike], photo_paths: Sequence[str | os.PathLike],
                        factor: int = 4, candidates: int = 3, threshold: float = COPY_THRESHOLD,
                        same_field: float = SAME_FIELD_THRESHOLD, workers: int | None = None) -> pd.DataFrame:
    """Find each crop in the photos by normalised cross-correlation of grey levels, one row per crop in input
    order (MAP_COLUMNS).

    Coarse: crops and photos block-averaged by `factor`, each crop's best position in every photo (`NccSearcher`);
    the `candidates` best photos are confirmed at full resolution (skimage `match_template`) in a ±2·`factor` px
    window, which fixes the position to the pixel: `score` is that grey NCC. Grey NCC of a blurred smear is high
    for any two similar fields, and some ALL-IDB2 crops are another shot of a field an even photo shows, so the
    decision is `detail`, the NCC of band-passed crop and photo patch: a copy (re-encoding noise allowed) scores
    >= `threshold`, another shot of the same field >= `same_field`. `status` is "copy", "same field" or "none".
    `photo`, `x`, `y` (top-left corner), `cx`, `cy` (centre of the crop's nominal square window: the cell) are set
    for copies only; `candidate` is the best photo whatever its status, `runner_up` the best detail elsewhere.

    Photos named as reserved ALL-IDB1 photos (odd numbers) are refused: their pixels must not be read.
    """
    photo_paths = [str(p) for p in photo_paths]
    crop_paths = [str(p) for p in crop_paths]
    reserved = [p for p in photo_paths if (n := parse_name(Path(p).name)) and is_reserved(n.number)]
    if reserved:
        raise ValueError(f"reserved (odd-numbered) ALL-IDB1 photos given: {', '.join(Path(p).name for p in reserved)}")
    stems = [Path(p).stem for p in photo_paths]
    if len(set(stems)) != len(stems):
        raise ValueError("photo names must be unique")
    workers = max(1, workers or os.cpu_count() or 1)
    crops = [_grey(p) for p in crop_paths]
    small = [_shrink(c, factor) for c in crops]

    def run(fn, args_list):
        if workers == 1 or len(args_list) < 2:
            return [fn(*a) for a in args_list]
        with ThreadPoolExecutor(min(workers, len(args_list))) as pool:  # scipy's FFTs and filters release the GIL
            return list(pool.map(lambda a: fn(*a), args_list))

    if photo_paths:
        coarse = np.stack(run(_coarse, [(p, small, factor) for p in photo_paths]), axis=1)  # (crops, photos, 3)
    else:
        coarse = np.full((len(crops), 0, 3), -1.0)
    jobs: dict[int, list] = {}
    for i in range(len(crops)):
        for j in np.argsort(-coarse[i, :, 0], kind="stable")[:candidates]:
            s, r, c = coarse[i, j]
            if s > -1:
                jobs.setdefault(int(j), []).append((i, crops[i], int(r) * factor, int(c) * factor))
    fine: dict[int, list[tuple[float, float, int, int, int]]] = {i: [] for i in range(len(crops))}
    for j, res in zip(jobs, run(_fine, [(photo_paths[j], jobs[j], 2 * factor) for j in jobs])):
        for i, s, d, y, x in res:
            fine[i].append((d, s, j, y, x))

    sizes: dict[int, tuple[int, int]] = {}
    rows = []
    for i, p in enumerate(crop_paths):
        h, w = crops[i].shape
        found = sorted(fine[i], key=lambda t: (-t[0], -t[1], t[2]))
        row = {"crop": Path(p).stem, "photo": None, "x": None, "y": None, "score": np.nan, "detail": np.nan,
               "status": "none", "candidate": None, "runner_up": np.nan, "width": w, "height": h,
               "cx": np.nan, "cy": np.nan}
        if found and found[0][1] > -1:
            d, s, j, y, x = found[0]
            row.update(score=s, detail=d, candidate=stems[j])
            others = [t[0] for t in found if t[2] != j]
            if others:
                row["runner_up"] = others[0]
            if d >= threshold:
                if j not in sizes:
                    from PIL import Image

                    with Image.open(photo_paths[j]) as im:
                        sizes[j] = im.size
                pw, ph = sizes[j]
                nominal = max(h, w)
                row.update(photo=stems[j], x=x, y=y, status="copy", cx=_cell_centre(x, w, nominal, pw),
                           cy=_cell_centre(y, h, nominal, ph))
            elif d >= same_field:
                row["status"] = "same field"
        rows.append(row)
    table = pd.DataFrame(rows, columns=MAP_COLUMNS).astype({"x": "Int64", "y": "Int64"})
    return _none_for_missing(table, ("photo", "candidate"))


# ----------------------------------------------------------------------------------------------------------
# The cached ALL-IDB2 mapping
def allidb2_crops(root: str | os.PathLike) -> list[Path]:
    """ALL-IDB2 crop files (`ALL_IDB2/img/ImXXX_Y.tif`, or directly in `ALL_IDB2`), sorted by name."""
    root = find_root(root)
    d = _child(root, "ALL_IDB2")
    if d is None:
        raise FileNotFoundError(f"no ALL_IDB2 folder in {root}")
    d = _child(d, "img") or d
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and parse_name(p.name) is not None)


def _key(files: Iterable[Path], params: dict) -> str:
    """Digest of names, sizes, mtimes and parameters: any change of a file or setting rebuilds the mapping."""
    h = hashlib.blake2b(digest_size=12)
    h.update(repr(sorted(params.items())).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def crop_map(root: str | os.PathLike, workers: int | None = None, rebuild: bool = False,
             cache: str | os.PathLike | None = None, factor: int = 4, candidates: int = 3,
             threshold: float = COPY_THRESHOLD, same_field: float = SAME_FIELD_THRESHOLD) -> pd.DataFrame:
    """Where each ALL-IDB2 crop comes from among the even ALL-IDB1 photos (`map_crops_to_photos`), cached.

    The CSV (default `ALL_IDB2/crop_to_photo.csv`) starts with a `# key=…` line: a digest of every crop's and
    even photo's name, size and mtime and of the parameters; it is reused while the key matches and rebuilt
    (about a minute on 2 cores) otherwise. Adds `label` (the crop's own Y), `usable` (a copy of an even photo's
    pixels: the only crops that may be used) and `duplicate_of` (an earlier crop cut at the same place of the same
    photo: ALL-IDB2 holds such twins, which would count one cell twice).
    """
    root = find_root(root)
    photos = read_allidb1(root).photos
    crop_files = allidb2_crops(root)
    photo_files = [Path(p) for p in photos["path"]]
    params = {"factor": factor, "candidates": candidates, "threshold": threshold, "same_field": same_field,
              "band": BAND, "version": _CACHE_VERSION}
    key = _key(crop_files + photo_files, params)
    if cache is None and crop_files:
        cache = crop_files[0].parent.parent / CACHE_NAME if crop_files[0].parent.name.lower() == "img" \
            else crop_files[0].parent / CACHE_NAME
    cache = Path(cache) if cache is not None else None
    table = None
    if cache is not None and cache.is_file() and not rebuild:
        with open(cache) as fh:
            header = fh.readline().strip()
        if header == f"# key={key}":
            table = pd.read_csv(cache, skiprows=1, keep_default_na=False, na_values={
                c: [""] for c in MAP_COLUMNS}, dtype={"crop": str, "photo": str, "status": str, "candidate": str})
            table = table.astype({"x": "Int64", "y": "Int64"})
    if table is None:
        table = map_crops_to_photos(crop_files, photo_files, factor=factor, candidates=candidates,
                                    threshold=threshold, same_field=same_field, workers=workers)
        if cache is not None:
            try:
                with atomic_path(cache) as tmp, open(tmp, "w") as fh:
                    fh.write(f"# key={key}\n")
                    table.to_csv(fh, index=False)
            except OSError:  # a read-only copy of the data: the mapping still comes back, just not cached
                pass
    table = _none_for_missing(table.copy(), ("photo", "candidate"))
    table.insert(1, "label", [parse_name(c).label for c in table["crop"]])
    table["usable"] = [p is not None and (n := parse_name(p)) is not None and not is_reserved(n.number)
                       for p in table["photo"]]
    first_at: dict[tuple, str] = {}
    twins = []
    for row in table.itertuples():
        place = (row.photo, row.x, row.y, row.width, row.height)
        twins.append(first_at.setdefault(place, row.crop) if row.photo is not None else None)
    table["duplicate_of"] = [t if t != c else None for t, c in zip(twins, table["crop"])]
    return _none_for_missing(table, ("duplicate_of",))
