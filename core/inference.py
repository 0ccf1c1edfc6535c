"""Prediction: test-time augmentation, ensembles, and folder-scale classification with overlapped I/O."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from core.dataset import IMAGE_EXTENSIONS, parse_uid
from core.imageio import ImageReadError
from core.preprocessing import load_crop


def dihedral(x: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/90-degree rotations of a batch (N, H, W, C): cells have no preferred orientation."""
    out = []
    for k in range(4):
        r = np.rot90(x, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return [np.ascontiguousarray(a) for a in out]


def predict_proba(models: Sequence, crops: np.ndarray, tta: bool = False, batch_size: int = 64) -> np.ndarray:
    """P(all) per crop, averaged over the models (an ensemble) and, with `tta`, over the 8 dihedral views."""
    views = dihedral(crops) if tta else [crops]
    total = np.zeros(len(crops))
    for model in models:
        for v in views:
            total += _predict(model, v, batch_size)
    return total / (len(models) * len(views))


def _predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    for s in range(0, len(x), batch_size):
        out.append(np.asarray(model.predict_on_batch(x[s:s + batch_size]), dtype="float64")[:, 1])
    return np.concatenate(out) if out else np.zeros(0)


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly plus image files found (recursively) under given folders, in a stable order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            found.append(p)
    return found


def _load(path: Path, size: int):
    try:
        return load_crop(path, size=size), None
    except ImageReadError as exc:
        return None, exc.reason
    except (OSError, ValueError) as exc:
        return None, str(exc)


def iter_crops(paths: Sequence[Path], size: int, chunk: int = 64, workers: int | None = None) -> Iterator[tuple]:
    """Yield (paths, crops, errors) chunks; decoding of the next chunks overlaps the caller's prediction."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
        pending = [pool.map(lambda p: _load(p, size), c) for c in chunks[:2]]
        for k, c in enumerate(chunks):
            results = list(pending[k])
            if k + 2 < len(chunks):
                pending.append(pool.map(lambda p: _load(p, size), chunks[k + 2]))
            ok = [i for i, (img, _) in enumerate(results) if img is not None]
            crops = np.stack([results[i][0] for i in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
            yield [c[i] for i in ok], crops, {str(c[i]): err for i, (img, err) in enumerate(results) if img is None}


def classify_files(models: Sequence, paths: Sequence[Path], size: int, rule=None, tta: bool = False,
                   gradcam_dir: str | os.PathLike | None = None, cam=None) -> pd.DataFrame:
    """Classify image files; a file that cannot be read becomes an error row and the rest go on.

    Columns: path, subject (from a `UID_` name), prediction, prob_all, prob_all_calibrated, uncertain, error.
    """
    from core.calibration import DecisionRule
    from core.explain import overlay

    rule = rule or DecisionRule()
    rows: list[dict] = []
    if gradcam_dir:
        Path(gradcam_dir).mkdir(parents=True, exist_ok=True)
    for ok_paths, crops, errors in iter_crops(list(paths), size):
        if len(crops):
            p = predict_proba(models, crops, tta=tta)
            decided = rule.decide(p)
            for i, path in enumerate(ok_paths):
                parsed = parse_uid(path.name)
                rows.append({"path": str(path), "subject": parsed.subject if parsed else None,
                             "prediction": decided.at[i, "prediction"], "prob_all": float(p[i]),
                             "prob_all_calibrated": float(decided.at[i, "prob_all_calibrated"]),
                             "uncertain": bool(decided.at[i, "uncertain"]), "error": None})
            if gradcam_dir and cam is not None:
                from PIL import Image

                _, maps = cam(crops)
                for path, crop, m in zip(ok_paths, crops, maps):
                    Image.fromarray(overlay(crop, m)).save(Path(gradcam_dir) / f"{path.stem}_gradcam.png")
        for path, err in errors.items():
            rows.append({"path": path, "subject": None, "prediction": None, "prob_all": np.nan,
                         "prob_all_calibrated": np.nan, "uncertain": None, "error": err})
    order = {str(p): i for i, p in enumerate(paths)}
    df = pd.DataFrame(rows, columns=["path", "subject", "prediction", "prob_all", "prob_all_calibrated",
                                     "uncertain", "error"])
    return df.sort_values("path", key=lambda s: s.map(order)).reset_index(drop=True)
