"""Hand-crafted cell features (the real-cell baseline) against shapes whose statistics are known by hand."""
import numpy as np
import pytest

pytest.importorskip("skimage")

from core.image.features import FEATURE_NAMES, cell_features, feature_baseline, feature_matrix  # noqa: E402


def _disk(r=20, size=64, colour=(120, 60, 160)):
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), "uint8")
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= r * r] = colour
    return img


def test_disk_shape_and_colour_statistics():
    f = dict(zip(FEATURE_NAMES, cell_features(_disk())))
    assert len(FEATURE_NAMES) == 24
    assert abs(f["area"] - np.pi * 400) / (np.pi * 400) < 0.03
    assert f["circularity"] > 0.85 and f["eccentricity"] < 0.2 and f["solidity"] > 0.95
    assert (f["mean_r"], f["mean_g"], f["mean_b"]) == (120, 60, 160)
    assert f["std_r"] == 0 and f["laplacian_var"] >= 0


def test_elongated_cell_and_empty_image():
    img = np.zeros((64, 64, 3), "uint8")
    img[28:36, 8:56] = 200
    f = dict(zip(FEATURE_NAMES, cell_features(img)))
    assert f["area"] == 8 * 48 and f["eccentricity"] > 0.9 and f["extent"] == 1.0
    assert np.isnan(cell_features(np.zeros((32, 32, 3), "uint8"))).all()


def test_baseline_separates_small_from_large_cells():
    rng = np.random.default_rng(0)
    imgs = np.stack([_disk(int(r)) for r in np.r_[rng.integers(10, 15, 20), rng.integers(20, 26, 20)]])
    X = feature_matrix(imgs)
    y = np.r_[np.zeros(20), np.ones(20)].astype(int)
    assert X.shape == (40, 24)
    clf = feature_baseline().fit(X[::2], y[::2])
    assert (clf.predict(X[1::2]) == y[1::2]).mean() == 1.0
