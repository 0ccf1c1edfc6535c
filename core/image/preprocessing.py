"""The report's preprocessing (crop 100 px per side, 450 -> 250, optional resize), channel statistics and
the on-disk uint8 crop cache the trainer slices batches from.

Crop rule for any input size (documented in the README): a non-square image is first padded with black to a
square (centred); then a margin of `margin / reference` of the side (100/450 by default) is cut from every
side; the result is resized to `size` (area-averaging when shrinking). A 450x450 C-NMC cell at size 250 is an
exact crop with no resampling.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.atomic import atomic_path
from core.data.imageio import ImageReadError, read_bmp_square_window, read_image

REFERENCE_SIDE = 450  # C-NMC tiles
CROP_MARGIN = 100  # report §5.1: 100 px from each side
CROP_SIZE = REFERENCE_SIDE - 2 * CROP_MARGIN  # 250
CACHE_VERSION = 1


def crop_cell(img: np.ndarray, size: int = CROP_SIZE, margin: int = CROP_MARGIN,
              reference: int = REFERENCE_SIDE) -> np.ndarray:
    """Apply the crop rule to an RGB uint8 image and return a (size, size, 3) uint8 crop."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    img = pad_square(img)
    h, w = img.shape[:2]
    m = crop_margin(h, margin, reference)
    crop = img[m:h - m, m:w - m]
    if crop.shape[0] < 1:
        raise ValueError(f"image of {h}x{w} pixels is too small to crop")
    return np.ascontiguousarray(crop if crop.shape[0] == size else _resize(crop, size))


def pad_square(img: np.ndarray) -> np.ndarray:
    """A non-square image centred on a black square (the crop rule's first step); a square one unchanged."""
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    sq = np.zeros((side, side, 3), np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    sq[top:top + h, left:left + w] = img
    return sq


def crop_margin(side: int, margin: int = CROP_MARGIN, reference: int = REFERENCE_SIDE) -> int:
    """Pixels cut per side of a square image of `side` pixels: the report's 100 px, scaled to the size."""
    return int(round(margin * side / reference))


def load_crop(source, size: int = CROP_SIZE, margin: int = CROP_MARGIN, name: str | None = None) -> np.ndarray:
    """Read any cell image and return its crop: the single entry point for files, uploads and predictions.

    For square 24-bit BMPs (all of C-NMC) only the kept rows are read: the same pixels as decoding all.
    """
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".bmp"):
        try:
            win = read_bmp_square_window(source, lambda side: crop_margin(side, margin))
        except OSError:
            win = None  # read_image below reports the error with the file's name
        if win is not None:
            return win if win.shape[0] == size else _resize(win, size)
    return crop_cell(read_image(source, name=name), size=size, margin=margin)


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    resample = Image.Resampling.BOX if crop.shape[0] > size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), resample))


def channel_stats(images: np.ndarray, indices: np.ndarray | None = None, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of pixels/255 over `indices` (the train split), streamed in chunks."""
    idx = np.arange(len(images)) if indices is None else np.sort(np.asarray(indices))
    if len(idx) == 0:
        raise ValueError("channel_stats needs at least one image")
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for start in range(0, len(idx), chunk):
        block = np.asarray(images[idx[start:start + chunk]], dtype=np.float64) / 255.0
        s += block.sum(axis=(0, 1, 2))
        s2 += np.square(block).sum(axis=(0, 1, 2))
        n += block.shape[0] * block.shape[1] * block.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
def cache_key(manifest: pd.DataFrame, size: int, margin: int) -> str:
    """Key of a cache: file identities (path, size, mtime) and the preprocessing parameters."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{margin}\n".encode())
    cols = manifest[["path", "size", "mtime_ns"]].astype(str)
    h.update("\n".join(cols["path"] + "|" + cols["size"] + "|" + cols["mtime_ns"]).encode())
    return h.hexdigest()[:20]


def cache_identity(paths: list[str], size: int, margin: int) -> str:
    """Which cells and parameters a cache holds, regardless of the files' sizes and times: caches with the
    same identity and another key are outdated versions of one another."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{margin}\n".encode())
    h.update("\n".join(paths).encode())
    return h.hexdigest()[:20]


def _drop_stale(cache_dir: Path, key: str, identity: str) -> None:
    """Remove outdated versions of this cache (same cells and parameters, files since changed); caches of
    other manifests or sizes sharing the folder are left alone."""
    for meta_file in cache_dir.glob("crops-*.json"):
        other = meta_file.name[len("crops-"):-len(".json")]
        if other == key:
            continue
        try:
            same = json.loads(meta_file.read_text()).get("identity") == identity
        except (OSError, ValueError):
            same = False
        if same:
            (cache_dir / f"crops-{other}.npy").unlink(missing_ok=True)
            meta_file.unlink(missing_ok=True)


def _worker_init(array_path: str):
    global _ARRAY
    _ARRAY = np.load(array_path, mmap_mode="r+")


def _fill(start: int, paths: list[str], size: int, margin: int) -> list[tuple[int, str]]:
    failures = []
    for k, p in enumerate(paths):
        try:
            _ARRAY[start + k] = load_crop(p, size=size, margin=margin)
        except (ImageReadError, ValueError, OSError) as exc:
            _ARRAY[start + k] = 0
            failures.append((start + k, str(getattr(exc, "reason", exc))))
    return failures  # no msync per chunk: the shared mapping is coherent; the completion marker comes last


@dataclass
class CropCache:
    """Decoded crops of a manifest as one memory-mapped uint8 array [N, size, size, 3] on disk.

    Row i is the crop of `paths[i]`; rows listed in `failures` could not be decoded (zeros) and are excluded
    by `valid`. Built once in parallel, reused while the files are unchanged, rebuilt (replacing the outdated
    version) when they change; caches of other manifests or sizes can share the folder.
    """

    array: np.ndarray
    paths: list[str]
    size: int
    margin: int
    key: str
    failures: dict[int, str] = field(default_factory=dict)
    reused: bool = False

    @property
    def valid(self) -> np.ndarray:
        ok = np.ones(len(self.paths), bool)
        ok[list(self.failures)] = False
        return ok

    def rows(self, paths) -> np.ndarray:
        """Row numbers of the given paths in the cache array."""
        lookup = {p: i for i, p in enumerate(self.paths)}
        try:
            return np.fromiter((lookup[p] for p in paths), dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"path not in crop cache: {exc.args[0]}") from None

    def problems(self) -> pd.DataFrame:
        return pd.DataFrame({"path": [self.paths[i] for i in self.failures], "source": "cache",
                             "reason": [f"decode failed: {r}" for r in self.failures.values()]})

    @classmethod
    def build(cls, manifest: pd.DataFrame, cache_dir: str | os.PathLike, size: int = CROP_SIZE,
              margin: int = CROP_MARGIN, workers: int | None = None, progress: bool = True) -> "CropCache":
        """Load the cache for this manifest and parameters, or build it (in parallel) if absent or stale."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = cache_key(manifest, size, margin)
        meta_path = cache_dir / f"crops-{key}.json"
        array_path = cache_dir / f"crops-{key}.npy"
        paths = manifest["path"].tolist()
        if meta_path.exists() and array_path.exists():  # the meta file is written last: it marks completion
            meta = json.loads(meta_path.read_text())
            array = np.load(array_path, mmap_mode="r")
            if array.shape == (len(paths), size, size, 3):
                return cls(array, paths, size, margin, key,
                           {int(k): v for k, v in meta["failures"].items()}, reused=True)
        identity = cache_identity(paths, size, margin)
        _drop_stale(cache_dir, key, identity)
        with atomic_path(array_path, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
            del out
            failures: dict[int, str] = {}
            workers = workers or os.cpu_count() or 1
            chunk = max(8, min(256, len(paths) // (workers * 8) + 1))
            t0 = time.perf_counter()
            bar = _progress(len(paths), progress, f"crop cache {size}px")
            ctx = _pool_context()
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(str(tmp),)) as pool:
                with _plain_main():  # worker processes are started by these submits
                    futures = {pool.submit(_fill, s, paths[s:s + chunk], size, margin): min(chunk, len(paths) - s)
                               for s in range(0, len(paths), chunk)}
                for fut in as_completed(futures):
                    failures.update(dict(fut.result()))
                    bar.update(futures[fut])
            bar.close()
        meta = {"key": key, "identity": identity, "size": size, "margin": margin, "n": len(paths), "version": CACHE_VERSION,
                "seconds": round(time.perf_counter() - t0, 3), "failures": {str(k): v for k, v in failures.items()}}
        with atomic_path(meta_path) as tmp_meta:
            tmp_meta.write_text(json.dumps(meta))
        return cls(np.load(array_path, mmap_mode="r"), paths, size, margin, key, failures)


_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _plain_main():
    """While worker processes start, `__main__` is a bare module: a forkserver worker (and the forkserver itself)
    would otherwise re-run the parent's main script, and under Streamlit that script is a dashboard page
    (`runpy` as `__mp_main__`: the page's main() ran in every worker and the pool broke). Our workers need
    nothing from `__main__`: they run `core.image.preprocessing` functions."""
    import sys
    import types

    with _MAIN_LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


def _pool_context():
    """fork when it is safe (fast start); forkserver once TensorFlow/JAX/torch run thread pools in this process
    (the trainer builds caches after importing Keras), since a forked copy of such a process can deadlock."""
    import sys

    if not any(m in sys.modules for m in ("tensorflow", "jax", "torch")):
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["core.image.preprocessing"])  # imported once by the server, inherited by workers
    return ctx


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", leave=False)
