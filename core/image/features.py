"""Hand-crafted cell features: the baseline a CNN has to beat on unseen patients.

Colour, texture and shape statistics of the segmented cell (C-NMC cells sit on black), after the features
haematologists name for blasts: size, nucleus-to-cell ratio, irregular outline, chromatin texture. Used with a
scikit-learn logistic regression (`feature_baseline`) by `benchmarks/bench_real.py`.
"""
from __future__ import annotations

import numpy as np

from core.image.stain import BACKGROUND, foreground

FEATURE_NAMES = (
    "area", "perimeter", "eccentricity", "solidity", "extent", "circularity", "major_axis", "minor_axis",
    "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "mean_h", "mean_e", "std_h",
    "dark_fraction", "dark_solidity", "glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation",
    "laplacian_var",
)


def cell_features(crop: np.ndarray, background: float = BACKGROUND) -> np.ndarray:
    """24 statistics (`FEATURE_NAMES`) of the largest foreground object of one RGB uint8 crop.

    Sizes are in pixels of the crop given (compare crops of one size only). A crop with no cell gives NaNs.
    """
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import graycomatrix, graycoprops
    from skimage.filters import laplace
    from skimage.measure import label, regionprops

    fg = foreground(crop, background)
    lab = label(fg)
    if lab.max() == 0:
        return np.full(len(FEATURE_NAMES), np.nan)
    props = max(regionprops(lab), key=lambda r: r.area)
    cell = lab == props.label
    px = crop[cell].astype("float64")
    hed = rgb2hed(crop)[cell]
    gray = rgb2gray(crop)
    g = gray[cell]
    dark = cell & (gray < np.median(g))  # the darker half of the cell: mostly nucleus/chromatin
    dark_props = regionprops(label(dark))
    dark_solidity = max(dark_props, key=lambda r: r.area).solidity if dark_props else np.nan
    r0, c0, r1, c1 = props.bbox
    q = np.clip((gray[r0:r1, c0:c1] * 31).astype("uint8"), 0, 31)
    q = np.where(cell[r0:r1, c0:c1], q + 1, 0).astype("uint8")  # 0 = background, excluded below
    glcm = graycomatrix(q, [1, 2], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=33)[1:, 1:]
    glcm = glcm.astype("float64") / max(glcm.sum(axis=(0, 1), keepdims=True).max(), 1)
    tex = [float(graycoprops(glcm, p).mean()) for p in ("contrast", "homogeneity", "energy", "correlation")]
    lap = laplace(gray)[cell]
    perim = max(props.perimeter, 1.0)
    return np.array([
        props.area, props.perimeter, props.eccentricity, props.solidity, props.extent,
        4 * np.pi * props.area / perim ** 2, props.axis_major_length, props.axis_minor_length,
        *px.mean(axis=0), *px.std(axis=0), hed[:, 0].mean(), hed[:, 1].mean(), hed[:, 0].std(),
        dark.sum() / max(cell.sum(), 1), dark_solidity, *tex, lap.var(),
    ], dtype="float64")


def feature_matrix(images: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """`cell_features` for each image (or the given rows of a crop cache), as an (N, 24) array."""
    idx = np.arange(len(images)) if rows is None else np.asarray(rows)
    return np.stack([cell_features(np.asarray(images[i])) for i in idx]) if len(idx) else np.zeros((0, 24))


def feature_baseline(seed: int = 0):
    """Impute, standardise, class-balanced logistic regression: the baseline of `bench_real.py`."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                         LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=seed))
