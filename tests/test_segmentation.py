"""Smear-field segmentation: white cells found and split on generated fields with known cells, C-NMC-like crops,
a C-NMC tile stays one cell, bad input gets a clear message."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.smear.segmentation import FRAME, segment_field  # noqa: E402
from core.smear.synthetic_fields import BACKGROUND, match, synth_field  # noqa: E402


@pytest.mark.parametrize("seed", range(4))
def test_white_cells_found_split_and_border_cells_dropped(seed):
    img, truth = synth_field(seed=seed, wbc=5, touching_pairs=1, border_cells=2, platelets=12)
    result = segment_field(img)
    m = match([c.box for c in result.cells], truth)
    assert m["recall"] >= 0.9, m
    assert m["false_fraction"] <= 0.1, m
    assert result.dropped_at_border >= 1
    # the labels drawn on the field are the kept cells, numbered 1..n
    assert set(np.unique(result.labels)) == {0, *range(1, len(result.cells) + 1)}


def test_touching_white_cells_are_split():
    img, truth = synth_field(seed=11, wbc=0, rbc=10, touching_pairs=1, border_cells=0, platelets=0)
    assert len(truth) == 2
    result = segment_field(img)
    assert len(result.cells) == 2
    assert match([c.box for c in result.cells], truth)["hits"] == 2


def test_red_cells_are_the_ruler():
    small, _ = synth_field(seed=3, rbc_px=30.0)
    large, _ = synth_field(seed=3, rbc_px=50.0, height=900, width=1200)
    a, b = segment_field(small), segment_field(large)
    assert a.rbc_diameter_px == pytest.approx(30.0, rel=0.12)
    assert b.rbc_diameter_px == pytest.approx(50.0, rel=0.12)
    # the same cells come out the same size whatever the magnification
    size = [np.median([(c.crop.max(-1) > 10).sum() for c in r.cells]) for r in (a, b)]
    assert size[0] == pytest.approx(size[1], rel=0.15)


def test_crops_look_like_cnmc_cells(cell_dir):
    """Cell-area fraction of the 450 frame within the band of C-NMC cells (the real samples where present),
    background black, cell centred."""
    real = [np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(p).convert("RGB"))
            for p in sorted(cell_dir.glob("*.bmp"))]
    fractions = [(x.max(-1) > 10).mean() for x in real]
    lo, hi = 0.75 * min(fractions), 1.25 * max(fractions)
    img, _ = synth_field(seed=2, wbc=6, touching_pairs=0, border_cells=0)
    result = segment_field(img)
    assert result.cells
    for c in result.cells:
        assert c.crop.shape == (FRAME, FRAME, 3) and c.crop.dtype == np.uint8
        fg = c.crop.max(-1) > 10
        assert lo <= fg.mean() <= hi, (fg.mean(), lo, hi)
        assert not c.crop[:20].any() and not c.crop[-20:].any()  # black border: the cell on black
        ys, xs = np.nonzero(fg)
        assert abs(ys.mean() - FRAME / 2) < 30 and abs(xs.mean() - FRAME / 2) < 30


def test_a_segmented_cnmc_cell_is_one_cell(cell_dir):
    from PIL import Image

    for path in sorted(cell_dir.glob("*.bmp"))[:3]:
        x = np.asarray(Image.open(path).convert("RGB"))
        if min(x.shape[:2]) < 300:
            continue
        result = segment_field(x, path.name)
        assert len(result.cells) == 1 and result.kind == "single cell"
        assert np.array_equal(result.cells[0].crop, x) or result.cells[0].crop.shape == (FRAME, FRAME, 3)


def test_field_without_white_cells_says_so():
    img, _ = synth_field(seed=4, wbc=0, touching_pairs=0, border_cells=0)
    result = segment_field(img, "reds.png")
    assert result.cells == [] and "no white cells found" in result.message and "reds.png" in result.message
    blank = np.full((400, 500, 3), BACKGROUND, np.uint8)
    assert "no white cells" in segment_field(blank, "blank.png").message


def test_bad_input_gets_a_clear_message_and_no_cells():
    """Segmentation never raises on an image: what it cannot judge comes back with no cells and the reason."""
    for img, name, why in [(np.zeros((120, 200, 3), np.uint8), "tiny.png", "too small"),
                           (np.zeros((400, 400), np.uint8), "grey.png", "colour"),
                           (np.zeros((400, 400, 3), np.float64), "float.tif", "8-bit")]:
        result = segment_field(img, name)
        assert result.cells == [] and why in result.message and name in result.message


def _lone_cell(side: int = 400, r: float = 30.0) -> np.ndarray:
    """One white cell on a plain background: no red cell, and a blob whose distance transform has a single top."""
    img = np.full((side, side, 3), BACKGROUND, np.uint8)
    yy, xx = np.mgrid[:side, :side]
    img[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 < r * r] = (110, 60, 150)
    return img


@pytest.mark.parametrize("case", ["lone cell", "all background", "200 px", "1-px strip", "noise", "red cells only"])
def test_edge_photos_never_raise_and_each_gets_a_row(case, tmp_path):
    """The inputs that raised or sit at the edge each give a result (cells, or none with the reason) and, through
    `segment_files`, a row of their own while the batch goes on."""
    from PIL import Image

    from core.smear.segmentation import segment_files

    rng = np.random.default_rng(0)
    img = {"lone cell": _lone_cell(),
           "all background": np.full((480, 640, 3), BACKGROUND, np.uint8),
           "200 px": synth_field(200, 200, wbc=1, rbc=6, platelets=0, touching_pairs=0, border_cells=0,
                                 rbc_px=24.0, seed=2)[0],
           "1-px strip": np.full((1, 640, 3), 128, np.uint8),
           "noise": rng.integers(0, 256, (300, 300, 3)).astype(np.uint8),
           "red cells only": synth_field(wbc=0, touching_pairs=0, border_cells=0, seed=5)[0]}[case]
    result = segment_field(img, "edge.png")
    assert result.cells or result.message, case
    assert result.labels.shape[:2] == img.shape[:2] or not result.cells
    good, _ = synth_field(seed=1, wbc=3, touching_pairs=0, border_cells=0)
    Image.fromarray(img).save(tmp_path / "edge.png")
    Image.fromarray(good).save(tmp_path / "good.png")
    table = segment_files([tmp_path / "edge.png", tmp_path / "good.png"], tmp_path / "crops")
    assert (table["field"] == str(tmp_path / "good.png")).sum() >= 3  # the batch went on
    edge = table[table["field"] == str(tmp_path / "edge.png")]
    assert len(edge) >= 1 and (edge["error"].notna().all() or edge["cell"].notna().all())


def test_a_blob_without_a_deep_peak_does_not_raise():
    """The fourth lab's crash (`IndexError: arrays used as indices must be of integer (or boolean) type`): a blob
    too big and concave for one cell, stained only at its outline (two touching rings), has no distance-transform
    top deep enough to be a marker; the empty marker array was used as indices. It now stays one cell."""
    img, _ = synth_field(wbc=0, touching_pairs=0, border_cells=0, platelets=0, rbc=25, seed=7)
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    ring = np.zeros(img.shape[:2], bool)
    for cx in (305, 395):
        d = np.hypot(yy - 300, xx - cx)
        ring |= (d > 40) & (d < 45)
    img[ring] = (110, 60, 150)
    result = segment_field(img, "rings.png")
    assert len(result.cells) == 1 and result.message == ""


def test_a_small_photo_is_judged_by_its_red_cells():
    """A 224-px photo with red cells about 12 px across is enlarged internally and its white cells found; one
    whose red cells measure 5 px is refused with the measured reason."""
    img, truth = synth_field(224, 224, wbc=2, rbc=25, platelets=0, touching_pairs=0, border_cells=0, rbc_px=12.0,
                             seed=3)
    result = segment_field(img, "small.png")
    assert result.rbc_diameter_px is not None and 9 <= result.rbc_diameter_px <= 15, result.rbc_diameter_px
    m = match([c.box for c in result.cells], truth)
    assert m["hits"] == len(truth), (m, result.message)
    assert any("enlarged" in n for n in result.notes)
    coarse, _ = synth_field(224, 224, wbc=2, rbc=60, platelets=0, touching_pairs=0, border_cells=0, rbc_px=5.0,
                            seed=3)
    refused = segment_field(coarse, "coarse.png")
    assert refused.cells == [] and "px across: too coarse to judge white cells" in refused.message, refused.message


def test_segment_and_predict_fields_from_the_cli(tmp_path):
    from PIL import Image

    from training.cli import main

    fields = tmp_path / "fields"
    fields.mkdir()
    img, truth = synth_field(seed=5, wbc=3, touching_pairs=0, border_cells=0)
    Image.fromarray(img).save(fields / "smear_a.png")
    (fields / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "cells"
    assert main(["segment", str(fields), "--out", str(out)]) == 0
    import pandas as pd

    table = pd.read_csv(out / "cells.csv")
    good = table[table["error"].isna()]
    assert len(good) == len(truth) and (good["field"].str.endswith("smear_a.png")).all()
    assert sorted(p.name for p in out.glob("*.png")) == [f"smear_a_cell{i:02d}.png" for i in range(1, 4)]
    assert table.loc[table["error"].notna(), "field"].str.endswith("broken.jpg").all()
    assert (good["x1"] > good["x0"]).all() and (good["mask_area_px"] > 0).all()

    calls = tmp_path / "calls.csv"
    assert main(["predict", "starter", str(fields / "smear_a.png"), "--fields", str(tmp_path / "crops"),
                 "--out", str(calls), "--runs-dir", str(tmp_path / "runs")]) == 0
    got = pd.read_csv(calls)
    assert len(got) == 3 and {"field", "cell", "x0", "y0", "prediction"} <= set(got.columns)
    assert got["cell"].tolist() == [1, 2, 3]


def test_the_ruler_is_the_red_cells_not_the_platelets_that_outnumber_them():
    """Round platelets outnumbering the few single red cells (as in clumped real smears, BCCD) must not become
    the ruler: an unweighted median of the round objects here is ~6 px, the red cells are 40 px."""
    img, truth = synth_field(seed=5, rbc=8, platelets=150, rbc_px=40.0)
    result = segment_field(img)
    assert abs(result.rbc_diameter_px - 40.0) < 6.0, result.rbc_diameter_px
    assert match([c.box for c in result.cells], truth)["recall"] >= 0.9


def test_normalised_field_crops_carry_cnmc_stain():
    """With normalize_stain each crop's cell pixels take C-NMC's LAB statistics (within uint8 rounding); the
    crop's shape and black background are those of the plain crop."""
    from skimage.color import rgb2lab

    from core.image.stain import CNMC_LAB_MEAN, CNMC_LAB_STD

    img, _ = synth_field(seed=2, wbc=3, touching_pairs=0, border_cells=0)
    plain, norm = segment_field(img), segment_field(img, normalize_stain=True)
    assert len(plain.cells) == len(norm.cells) >= 3
    for a, b in zip(plain.cells, norm.cells):
        fg = a.crop.max(-1) > 10
        assert ((b.crop.max(-1) > 10) == fg).all()
        lab = rgb2lab(b.crop[fg] / 255.0)
        np.testing.assert_allclose(lab.mean(0), CNMC_LAB_MEAN, atol=0.6)
        np.testing.assert_allclose(lab.std(0), CNMC_LAB_STD, atol=0.6)
    assert any("stain normalised" in n for n in norm.notes)


def test_cli_normalises_field_crops_only_for_fields(tmp_path, capsys):
    from PIL import Image

    from core.image.stain import CNMC_LAB_MEAN
    from training.cli import main

    img, _ = synth_field(seed=5, wbc=3, touching_pairs=0, border_cells=0)
    Image.fromarray(img).save(tmp_path / "smear.png")
    assert main(["segment", str(tmp_path / "smear.png"), "--out", str(tmp_path / "n"), "--normalize-stain"]) == 0
    from skimage.color import rgb2lab

    crop = np.asarray(Image.open(tmp_path / "n" / "smear_cell01.png"))
    lab = rgb2lab(crop[crop.max(-1) > 10] / 255.0)
    np.testing.assert_allclose(lab.mean(0), CNMC_LAB_MEAN, atol=0.6)
    assert main(["predict", "starter", str(tmp_path / "smear.png"), "--normalize-stain",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "--normalize-stain applies to smear fields" in capsys.readouterr().err


@pytest.mark.parametrize("height,width,rbc_px", [(480, 640, 40.0), (1944, 2592, 85.0)])
def test_the_ruler_holds_across_cameras_and_magnifications(height, width, rbc_px):
    """BCCD-like 640x480 at one magnification and ALL-IDB1-like 2592x1944 at another: the red cells' diameter is
    read in field pixels either way, and the crops come out at C-NMC scale (a red cell would span RBC_TARGET_PX)."""
    from core.smear.segmentation import RBC_TARGET_PX

    img, truth = synth_field(height, width, wbc=4, rbc=int(0.25 * height * width / rbc_px ** 2), platelets=10,
                             touching_pairs=0, border_cells=0, rbc_px=rbc_px, seed=4)
    result = segment_field(img)
    assert result.rbc_diameter_px == pytest.approx(rbc_px, rel=0.12)
    assert result.scale == pytest.approx(RBC_TARGET_PX / result.rbc_diameter_px)
    assert match([c.box for c in result.cells], truth)["recall"] == 1.0


def test_many_dark_white_cells_do_not_fool_the_ruler():
    """ALL-IDB1's failure: with many deep-violet white cells a two-class threshold separates them from everything
    else, the red cells fall into the background, and fragments became the ruler (14 px for 70-px red cells).
    The three-class mask on green still sees the red cells."""
    img, truth = synth_field(900, 1200, wbc=18, rbc=90, platelets=10, touching_pairs=0, border_cells=0,
                             rbc_px=60.0, seed=6)
    result = segment_field(img)
    assert result.rbc_diameter_px == pytest.approx(60.0, rel=0.12)
    assert match([c.box for c in result.cells], truth)["recall"] >= 0.9


def test_a_cell_cut_by_the_border_is_kept_when_mostly_inside():
    """A white cell whose larger part is in the field is counted and judged (flagged at_border); a sliver is not."""
    img, truth = synth_field(600, 800, wbc=0, rbc=40, platelets=0, touching_pairs=0, border_cells=0, seed=8)
    from core.smear.synthetic_fields import CYTOPLASM, NUCLEUS, _disc

    canvas = img.astype(np.float32)
    _disc(canvas, 300, 800 + 12, 26, CYTOPLASM)  # 14 px of a 52-px-wide cell inside: a sliver
    _disc(canvas, 300, 800 + 12, 18, NUCLEUS)
    _disc(canvas, 150, 12, 26, CYTOPLASM)  # its centre 14 px from the left edge: most of it inside
    _disc(canvas, 150, 12, 18, NUCLEUS)
    result = segment_field(canvas.astype(np.uint8))
    kept = [c for c in result.cells if c.at_border]
    assert len(kept) == 1 and kept[0].box[0] < 10  # the left one
    assert len(result.cells) == 1  # the sliver is neither kept nor judged
