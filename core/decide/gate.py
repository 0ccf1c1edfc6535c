"""The out-of-distribution gate: which images a model may judge at all.

A classifier of segmented C-NMC cells gives a confident class to anything: a screenshot, a smear field, a
photo. The gate refuses such inputs with a reason in plain words, in two stages:

1. `ImageGate` (image level, before the model): the image must look like the training data: one cell on a
   black background, not cut by the border, of a size and colour inside the band of the training cells.
   Measured on the whole image (padded to a square as the crop rule does, shrunk to `GATE_SIDE` px), so
   a cell the 100-px crop would cut is still judged whole.
2. `FeatureNovelty` (model level): the Mahalanobis distance (Ledoit-Wolf covariance) of the model's
   penultimate-layer features from those of the training cells, thresholded at a high percentile of
   held-out cells' distances (Lee et al. 2018's detector, one class-agnostic Gaussian).

Both are fitted at the end of training and saved beside the model (`gate.json`), so they travel with it.
"""
from __future__ import annotations

import json
import os
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.data.atomic import atomic_write_text
from core.image.stain import foreground

GATE_SIDE = 150  # pixels of the square the image-level checks work on

REASONS = {
    "blank": "no cell: the image is blank",
    "field": "a field with many cells, not one segmented cell",
    "no_black": "no cell on a black background",
    "several": "several objects on the black background, not one segmented cell",
    "border": "the cell is cut by the image border",
    "size": "cell size outside the range of the training cells",
    "colour": "colours outside the stain range of the training cells",
    "novel": "unlike any training cell (model features far from the training cells')",
}


def _square_small(img: np.ndarray, side: int = GATE_SIDE) -> np.ndarray:
    from PIL import Image

    from core.image.preprocessing import pad_square

    img = pad_square(img)
    if img.shape[0] == side:
        return img
    if img.shape[0] % side == 0:  # C-NMC's 450 px: every third pixel, no resampling cost
        k = img.shape[0] // side
        return img[k // 2::k, k // 2::k]
    resample = Image.Resampling.BOX if img.shape[0] > side else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((side, side), resample))


def image_stats(img: np.ndarray) -> dict:
    """What the image-level checks look at, for one RGB uint8 image of any size."""
    from skimage.measure import label, regionprops

    small = _square_small(img)
    fg = foreground(small)
    n = fg.size
    h, w = img.shape[:2]
    # the black share is judged on the image itself (padding a wide photo with black would fake a background)
    out = {"foreground": float(fg.sum() * max(h, w) ** 2 / (h * w) / n), "objects": 0, "area": 0.0,
           "border": False, "mean_rgb": [np.nan] * 3, "stained_blobs": 0}
    if fg.any():
        lab = label(fg)
        areas = np.bincount(lab.ravel())[1:]
        out["objects"] = int((areas >= 0.002 * n).sum())
        cell = lab == int(np.argmax(areas)) + 1
        rows, cols = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
        out["area"] = float(areas.max() / n)
        out["border"] = bool(rows[0] == 0 or cols[0] == 0 or rows[-1] == small.shape[0] - 1
                             or cols[-1] == small.shape[1] - 1)
        out["mean_rgb"] = small[cell].mean(axis=0).astype(float).tolist()
    if out["foreground"] > 0.5:  # not a cell on black: count stain-like (violet, darker than the rest) blobs
        from skimage.filters import gaussian

        f = gaussian(small.astype("float32"), sigma=1.5, channel_axis=-1, preserve_range=True)  # noise averages out
        violet = ((f[..., 0] + f[..., 2]) / 2 - f[..., 1] > 25) & (f.mean(-1) < np.percentile(f.mean(-1), 60))
        out["stained_blobs"] = sum(1 for p in regionprops(label(violet))
                                   if p.area >= 0.001 * n and p.solidity > 0.8 and p.extent < 0.9)  # round
    return out


def on_black(img: np.ndarray, min_black: float = 0.5) -> bool:
    """Whether an image is (at most) one cell on a black background, as C-NMC's are; anything else (a smear photo,
    sparse or dense, a photo of anything) is tried as a field by the pages and the CLI."""
    return 1 - image_stats(img)["foreground"] >= min_black


@dataclass
class ImageGate:
    """Bands of the training cells' image statistics; `check` returns a reason key, or None to pass."""

    min_black: float = 0.5  # fraction of the (padded, square) image that must be black background
    area_band: tuple[float, float] = (0.02, 0.5)  # the cell's share of the square frame
    rgb_low: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    rgb_high: list[float] = field(default_factory=lambda: [255.0, 255.0, 255.0])
    fitted_on: str = "none (defaults)"

    def check(self, img: np.ndarray) -> str | None:
        s = image_stats(img)
        if s["foreground"] < 0.001:
            return "blank"
        if 1 - s["foreground"] < self.min_black:  # as `on_black`
            return "field" if s["stained_blobs"] >= 3 else "no_black"
        if s["objects"] > 1:
            return "several"
        if s["border"]:
            return "border"
        if not self.area_band[0] <= s["area"] <= self.area_band[1]:
            return "size"
        rgb = np.asarray(s["mean_rgb"])
        if np.any(rgb < self.rgb_low) or np.any(rgb > self.rgb_high):
            return "colour"
        return None

    @classmethod
    def fit(cls, images, margin: float = 0.25, fitted_on: str = "training cells") -> "ImageGate":
        """Bands from training images: cell area within [p0.5 / (1 + margin), p99.5 * (1 + margin)], mean
        colour per channel within [p0.5, p99.5] widened by `margin` of that range."""
        stats = [image_stats(np.asarray(im)) for im in images]
        stats = [s for s in stats if s["objects"] >= 1]
        if len(stats) < 10:
            raise ValueError(f"the image gate needs at least 10 training cells on black (got {len(stats)})")
        area = np.array([s["area"] for s in stats])
        rgb = np.array([s["mean_rgb"] for s in stats])
        lo, hi = np.percentile(rgb, 0.5, axis=0), np.percentile(rgb, 99.5, axis=0)
        pad = margin * (hi - lo) + 5
        a_lo, a_hi = np.percentile(area, [0.5, 99.5])
        return cls(area_band=(float(a_lo / (1 + margin)), float(min(1.0, a_hi * (1 + margin)))),
                   rgb_low=np.maximum(lo - pad, 0).round(2).tolist(), rgb_high=np.minimum(hi + pad, 255).round(2).tolist(),
                   fitted_on=f"{fitted_on} ({len(stats)} cells)")


def mahalanobis(features: np.ndarray, mean, precision) -> np.ndarray:
    """Each row's Mahalanobis distance to a Gaussian (its mean and precision matrix)."""
    d = np.asarray(features, dtype="float64") - np.asarray(mean)
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, np.asarray(precision), d), 0.0))


@dataclass
class FeatureNovelty:
    """Mahalanobis distance of penultimate-layer features to the training cells' Gaussian; or, with
    `components` (one Gaussian per source of training cells, e.g. per lab: {name, mean, precision, threshold}),
    the smallest of each component's distance over its own threshold, and `threshold` 1: a cell is judged when it
    lies within what any one source's cells span (one Gaussian over several labs' cells would be broad where
    none of them is, and tight around the largest lab)."""

    mean: list[float]
    precision: list[list[float]]
    threshold: float
    percentile: float = 99.0
    fitted_on: str = ""
    components: list[dict] = field(default_factory=list)

    def score(self, features: np.ndarray) -> np.ndarray:
        if self.components:
            return np.min([mahalanobis(features, c["mean"], c["precision"]) / c["threshold"]
                           for c in self.components], axis=0)
        return mahalanobis(features, self.mean, self.precision)

    @classmethod
    def mixture(cls, parts: list[tuple[str, np.ndarray, float]], percentile: float = 99.0,
                fitted_on: str = "") -> "FeatureNovelty":
        """One Gaussian per (name, training features, threshold on its distances)."""
        from sklearn.covariance import LedoitWolf

        comps = []
        for name, feats, threshold in parts:
            lw = LedoitWolf().fit(np.asarray(feats, dtype="float64"))
            comps.append({"name": name, "mean": lw.location_.tolist(), "precision": lw.precision_.tolist(),
                          "threshold": float(threshold)})
        return cls([], [], 1.0, percentile, fitted_on, comps)

    def novel(self, features: np.ndarray) -> np.ndarray:
        return self.score(features) > self.threshold

    @classmethod
    def fit(cls, train_features: np.ndarray, heldout_features: np.ndarray, percentile: float = 99.0,
            fitted_on: str = "") -> "FeatureNovelty":
        """Gaussian of the training features; threshold at `percentile` of the held-out cells' distances."""
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(np.asarray(train_features, dtype="float64"))
        gate = cls(lw.location_.tolist(), lw.precision_.tolist(), 0.0, percentile, fitted_on)
        gate.threshold = float(np.percentile(gate.score(heldout_features), percentile))
        return gate


@dataclass
class Gate:
    """Both stages; what travels with a model as `gate.json`."""

    image: ImageGate | None  # None: no image-level check (a model whose inputs are not cells on black)
    novelty: FeatureNovelty | None = None
    false_rejection: dict = field(default_factory=dict)  # measured on held-out cells when fitted

    def save(self, path: str | os.PathLike) -> None:
        data = {"image": asdict(self.image) if self.image is not None else None, "novelty": asdict(self.novelty) if self.novelty else None,
                "false_rejection": self.false_rejection}
        atomic_write_text(path, json.dumps(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Gate":
        data = json.loads(Path(path).read_text())
        image = ImageGate(**{**data["image"], "area_band": tuple(data["image"]["area_band"])}) \
            if data.get("image") else None
        novelty = FeatureNovelty(**data["novelty"]) if data.get("novelty") else None
        return cls(image, novelty, data.get("false_rejection", {}))


_FEATURE_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def feature_model(model):
    """A model returning (penultimate features, probabilities) in one pass: the layer named `pool`. Built
    once per model (a new Keras model would be traced again on every call)."""
    import keras

    fm = _FEATURE_MODELS.get(model)
    if fm is None:
        fm = keras.Model(model.inputs, [model.get_layer("pool").output, model.outputs[0]])
        _FEATURE_MODELS[model] = fm
    return fm


def features_and_probs(fmodel, crops: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    feats, probs = [], []
    for s in range(0, len(crops), batch_size):
        f, p = fmodel.predict_on_batch(np.asarray(crops[s:s + batch_size]))
        feats.append(np.asarray(f, dtype="float64"))
        probs.append(np.asarray(p, dtype="float64")[:, 1])
    if not feats:
        return np.zeros((0, 0)), np.zeros(0)
    return np.concatenate(feats), np.concatenate(probs)


def fit_gate(model, train_images, train_crops: np.ndarray, heldout_images=None, heldout_crops=None,
             percentile: float = 99.0, fitted_on: str = "training cells") -> Gate:
    """Fit both stages for `model`: the image bands on `train_images` (whole images), the feature Gaussian on
    `train_crops`, its threshold at `percentile` of the held-out crops' distances (without held-out cells, at
    99.5 of the training cells' own, which is lenient for new patients: stated in `fitted_on`). Records the
    false-rejection rate on the held-out cells, by reason."""
    image = ImageGate.fit(train_images, fitted_on=fitted_on)
    fmodel = feature_model(model)
    train_f, _ = features_and_probs(fmodel, train_crops)
    have_heldout = heldout_crops is not None and len(heldout_crops) > 0
    if have_heldout:
        held_f, _ = features_and_probs(fmodel, heldout_crops)
        novelty = FeatureNovelty.fit(train_f, held_f, percentile, f"{fitted_on}; threshold: {percentile}th "
                                                                   "percentile of held-out cells")
    else:
        novelty = FeatureNovelty.fit(train_f, train_f, 99.5, f"{fitted_on}; threshold: 99.5th percentile of "
                                                             "the training cells themselves (no held-out cells)")
    gate = Gate(image, novelty)
    if have_heldout:
        reasons = [image.check(np.asarray(im)) for im in (heldout_images or [])]
        novel = novelty.novel(held_f)
        n_img = len(reasons)
        gate.false_rejection = {
            "cells": int(len(held_f)), "image_checked": n_img,
            "image_rejected": float(np.mean([r is not None for r in reasons])) if n_img else None,
            "image_reasons": {k: reasons.count(k) for k in set(reasons) if k},
            "novelty_rejected": float(novel.mean()),
        }
    return gate
