"""The out-of-distribution gate: generated non-cells are refused with the right reason, real cells pass, and
refused images get no class anywhere (core, CLI)."""
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("skimage")

from core.decide.gate import REASONS, FeatureNovelty, Gate, ImageGate, image_stats  # noqa: E402
from core.data.imageio import encode_bmp, read_image  # noqa: E402


@pytest.fixture(scope="module")
def real_cells(cell_dir):
    return [read_image(p) for p in sorted((cell_dir).glob("*.bmp"))]


@pytest.fixture(scope="module")
def gate(real_cells):
    """Fitted on the 8 dihedral views of the 7 real sample cells (56 images)."""
    views = [np.rot90(c, k)[:, ::f] for c in real_cells for k in range(4) for f in (1, -1)]
    return ImageGate.fit(views, fitted_on="sample views")


def _disk(img, cy, cx, r, colour):
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
    return img


def non_cells(real_cells):
    rng = np.random.default_rng(0)
    cell = real_cells[0]
    many = np.zeros((450, 450, 3), np.uint8)
    for (y, x) in ((110, 110), (110, 340), (340, 225)):
        small = cell[100:350:2, 100:350:2]
        many[y - 62:y + 63, x - 62:x + 63] = small
    cut = np.zeros_like(cell)
    cut[:, :250] = cell[:, 200:]
    field = np.full((600, 800, 3), (228, 200, 212), np.uint8)
    for k in range(7):
        _disk(field, 80 + 70 * k % 500, 90 + 100 * k, 28, (120, 60, 160))
    for k in range(30):
        _disk(field, rng.integers(30, 570), rng.integers(30, 770), 20, (205, 120, 130))  # red cells
    gradient = np.dstack([np.tile(np.linspace(40, 250, 640), (480, 1))] * 3).astype(np.uint8)
    gradient[..., 1] = np.clip(gradient[..., 1] * 0.8 + 30, 0, 255)
    tiny = _disk(np.zeros((450, 450, 3), np.uint8), 225, 225, 12, (80, 40, 90))
    green = _disk(np.zeros((450, 450, 3), np.uint8), 225, 225, 90, (40, 200, 40))
    return {
        "blank": (np.zeros((300, 300, 3), np.uint8), "blank"),
        "white page": (np.full((300, 400, 3), 255, np.uint8), "no_black"),
        "noise": (rng.integers(0, 256, (256, 256, 3)).astype(np.uint8), "no_black"),
        "photo-like gradient": (gradient, "no_black"),
        "smear field": (field, "field"),
        "three cells on black": (many, "several"),
        "cell cut by the border": (cut, "border"),
        "tiny object": (tiny, "size"),
        "green object": (green, "colour"),
    }


def test_real_sample_cells_pass(gate, real_cells):
    assert [gate.check(c) for c in real_cells] == [None] * len(real_cells)
    lo, hi = gate.area_band
    assert 0 < lo < hi < 1


def test_generated_non_cells_are_refused_with_the_right_reason(gate, real_cells):
    got = {name: gate.check(img) for name, (img, _) in non_cells(real_cells).items()}
    assert got == {name: want for name, (_, want) in non_cells(real_cells).items()}
    assert all(REASONS[r] for r in got.values())


def test_image_stats_hand_computed():
    img = _disk(np.zeros((150, 150, 3), np.uint8), 75, 75, 30, (100, 50, 120))
    s = image_stats(img)
    assert s["objects"] == 1 and not s["border"]
    assert abs(s["area"] - np.pi * 900 / 150 ** 2) < 0.005
    assert s["mean_rgb"] == [100.0, 50.0, 120.0]


def test_feature_novelty_threshold_and_round_trip(tmp_path, gate):
    rng = np.random.default_rng(0)
    train, held = rng.normal(size=(500, 4)), rng.normal(size=(200, 4))
    nov = FeatureNovelty.fit(train, held, percentile=99.0)
    assert 0.005 <= nov.novel(held).mean() <= 0.02  # 1% of the held-out cells by construction
    assert nov.novel(rng.normal(size=(50, 4)) + 8).all()  # far from every training feature
    d = nov.score(np.zeros((1, 4)))[0]
    assert d < 0.3  # the training mean is (nearly) the Gaussian's centre
    Gate(gate, nov, {"cells": 200}).save(tmp_path / "gate.json")
    back = Gate.load(tmp_path / "gate.json")
    assert back.image == gate and back.novelty.threshold == nov.threshold and back.false_rejection == {"cells": 200}


def test_refused_images_get_no_class_in_classify(gate, real_cells, tmp_path):
    keras = pytest.importorskip("keras")
    from core.decide.inference import classify
    from core.nets.models import create_model

    model = create_model("solution_a", 32, standardize=True, filters=(4, 4, 4, 4))
    items = [("cell.bmp", encode_bmp(real_cells[0]))] + [
        (f"{name}.bmp", encode_bmp(img)) for name, (img, _) in non_cells(real_cells).items()]
    items.append(("broken.bmp", b"BM not an image"))
    table = classify([model], items, 32, gate=Gate(gate))
    cell = table.iloc[0]
    assert cell["prediction"] in ("all", "hem") and not cell["out_of_distribution"] and pd.isna(cell["ood_reason"])
    refused = table.iloc[1:-1]
    assert refused["out_of_distribution"].all() and refused["prediction"].isna().all()
    assert refused["prob_all"].isna().all() and refused["ood_reason"].str.len().gt(10).all()
    assert table.iloc[-1]["error"] and pd.isna(table.iloc[-1]["prediction"])
    assert keras is not None
