"""Prediction: test-time augmentation, ensembles, and folder-scale classification with overlapped I/O."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from core.data.dataset import IMAGE_EXTENSIONS, parse_uid
from core.data.imageio import ImageReadError, read_image
from core.image.preprocessing import CROP_MARGIN, crop_cell, load_crop


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


def _load(name: str, source, size: int, image_gate=None, margin: int = CROP_MARGIN):
    """(crop, error, gate reason key) of one item; with an image gate the whole image is decoded and checked
    (a cell the crop would cut is judged whole), otherwise only the crop is read."""
    try:
        if image_gate is None:
            return load_crop(source, size=size, margin=margin, name=name), None, None
        img = read_image(source, name=name)
        return crop_cell(img, size=size, margin=margin), None, image_gate.check(img)
    except ImageReadError as exc:
        return None, exc.reason, None
    except (OSError, ValueError) as exc:
        return None, str(exc), None


def iter_crops(items: Sequence[tuple[str, object]], size: int, chunk: int = 64, workers: int | None = None,
               image_gate=None, margin: int = CROP_MARGIN) -> Iterator[tuple[list[str], np.ndarray, dict[str, str], list]]:
    """Yield (names, crops, errors by name, image-gate reason keys) per chunk of (name, path-or-bytes) items;
    decoding of the next chunks overlaps the caller's prediction of this one."""
    workers = workers or min(4, os.cpu_count() or 1)
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]

    def load(it):
        return _load(it[0], it[1], size, image_gate, margin)

    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.map(load, c) for c in chunks[:2]]
        for k, c in enumerate(chunks):
            results = list(pending[k])
            if k + 2 < len(chunks):
                pending.append(pool.map(load, chunks[k + 2]))
            ok = [i for i, (img, _, _) in enumerate(results) if img is not None]
            crops = np.stack([results[i][0] for i in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
            yield ([c[i][0] for i in ok], crops, {c[i][0]: err for i, (img, err, _) in enumerate(results) if img is None},
                   [results[i][2] for i in ok])


RESULT_COLUMNS = ["name", "subject", "prediction", "prob_all", "prob_all_calibrated", "uncertain",
                  "out_of_distribution", "ood_reason", "error"]


def classify(models: Sequence, items: Sequence[tuple[str, object]], size: int, rule=None, tta: bool = False,
             on_chunk: Callable[[list[str], np.ndarray], None] | None = None, gate=None,
             margin: int = CROP_MARGIN) -> pd.DataFrame:
    """Classify (name, path-or-bytes) items; one that cannot be read becomes an error row, the rest go on.

    One row per item, in input order: name, subject (from a `UID_` name), prediction, prob_all, calibrated
    probability, uncertain (the review band), out_of_distribution, ood_reason and error. With a `gate`
    (`core.decide.gate.Gate`), an image it refuses gets no class and no probability, only the reason in plain words.
    `on_chunk(names, crops)` sees every decoded chunk (for Grad-CAM or display) while the next one is read.
    """
    from core.decide.calibration import DecisionRule
    from core.decide.gate import REASONS, features_and_probs, feature_model

    rule = rule or DecisionRule()
    novelty = gate.novelty if gate is not None else None
    fmodel = feature_model(models[0]) if novelty is not None else None
    rows: list[dict] = []
    for names, crops, errors, reasons in iter_crops(list(items), size, margin=margin,
                                                    image_gate=gate.image if gate is not None else None):
        if len(crops):
            reasons = list(reasons)
            if fmodel is not None:
                feats, p0 = features_and_probs(fmodel, crops)
                reasons = [r or ("novel" if bad else None) for r, bad in zip(reasons, novelty.novel(feats))]
                p = p0 if len(models) == 1 and not tta else predict_proba(models, crops, tta=tta)
            else:
                p = predict_proba(models, crops, tta=tta)
            for i, name in enumerate(names):
                parsed = parse_uid(Path(name).name)
                # the call itself is made below, once for the whole batch (the subject correction needs it)
                rows.append({"name": name, "subject": parsed.subject if parsed else None, "error": None,
                             "out_of_distribution": reasons[i] is not None,
                             "ood_reason": REASONS[reasons[i]] if reasons[i] else None, "prediction": None,
                             "prob_all": float(p[i]) if reasons[i] is None else np.nan,
                             "prob_all_calibrated": np.nan, "uncertain": None})
            if on_chunk is not None:
                on_chunk(names, crops)
        for name, err in errors.items():
            rows.append({"name": name, "subject": None, "prediction": None, "prob_all": np.nan,
                         "prob_all_calibrated": np.nan, "uncertain": None, "out_of_distribution": None,
                         "ood_reason": None, "error": err})
    order = {name: i for i, (name, _) in enumerate(items)}
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    df = df.sort_values("name", key=lambda s: s.map(order)).reset_index(drop=True)
    judged = df["prob_all"].notna().to_numpy()  # read and inside the gate
    decided = rule.decide(df.loc[judged, "prob_all"].to_numpy(), subjects=df.loc[judged, "subject"].tolist())
    for col in ("prob_all_calibrated", "prediction", "uncertain"):
        df.loc[judged, col] = decided[col].to_numpy()
    if "subject_corrected" in decided:  # only a rule with the per-subject correction says so
        df["subject_corrected"] = False
        df.loc[judged, "subject_corrected"] = decided["subject_corrected"].to_numpy()
    return df


def classify_files(models: Sequence, paths: Sequence[Path], size: int, rule=None, tta: bool = False,
                   gradcam_dir: str | os.PathLike | None = None, cam=None, gate=None,
                   margin: int = CROP_MARGIN) -> pd.DataFrame:
    """`classify` for files (a `path` column instead of `name`), optionally writing Grad-CAM overlays."""
    from PIL import Image

    from core.nets.explain import overlay

    save = None
    if gradcam_dir and cam is not None:
        Path(gradcam_dir).mkdir(parents=True, exist_ok=True)

        def save(names, crops):
            for name, crop, heat in zip(names, crops, cam(crops)[1]):
                Image.fromarray(overlay(crop, heat)).save(Path(gradcam_dir) / f"{Path(name).stem}_gradcam.png")

    items = [(str(p), p) for p in paths]
    return classify(models, items, size, rule, tta, on_chunk=save, gate=gate, margin=margin).rename(
        columns={"name": "path"})


def review_queue(table: pd.DataFrame, threshold: float, prob: str = "prob_all_calibrated",
                 ood: str = "out_of_distribution", error: str = "error") -> pd.DataFrame:
    """The table reordered so an expert's minutes go where the model is least able to decide: first the cells
    the gate refused (the model cannot judge them at all), then judged cells by the distance of their calibrated
    P(blast) from the decision threshold (nearest first), unreadable files last. Adds `review_rank` (1 = first)
    and `review_reason`."""
    t = table.copy()
    failed = t[error].notna() if error in t else pd.Series(False, index=t.index)
    refused = t[ood].fillna(False).astype(bool) & ~failed
    distance = (pd.to_numeric(t[prob], errors="coerce") - threshold).abs()
    tier = np.where(failed, 2, np.where(refused, 0, 1))
    order = np.lexsort((np.arange(len(t)), distance.fillna(np.inf).to_numpy(), tier))
    t = t.iloc[order].reset_index(drop=True)
    d = distance.iloc[order].reset_index(drop=True)
    tier = tier[order]
    t["review_rank"] = np.arange(1, len(t) + 1)
    t["review_reason"] = [("out of distribution: the model cannot judge it" if k == 0 else
                           "unreadable file" if k == 2 else f"|P(blast) - threshold| = {dist:.3f}")
                          for k, dist in zip(tier, d)]
    return t
