"""A smear field to per-cell calls (`core.fields`): every white cell found gets a row with its box and a call,
outlines coloured by that call, a consistent per-field summary, and clear answers for fields without cells."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.calibration import DecisionRule  # noqa: E402
from core.fields import CALL_COLOURS, call_of, cell_name, classify_field  # noqa: E402
from core.segmentation import segment_field  # noqa: E402
from core.synthetic_fields import BACKGROUND, synth_field  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    from core.models import create_model

    return create_model("solution_a", 32)


def _outline_colours(fc, labels):
    """The colour of each cell's outline pixels: the most common colour on its mask's inner boundary."""
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(labels, mode="inner")
    out = {}
    for n in np.unique(labels[labels > 0]):
        px = fc.overlay[edges & (labels == n)]
        vals, counts = np.unique(px, axis=0, return_counts=True)
        out[int(n)] = tuple(int(v) for v in vals[counts.argmax()])
    return out


@pytest.mark.parametrize("threshold, call", [(0.0, "blast"), (1.0, "normal")])
def test_every_cell_found_gets_its_box_and_a_call_and_its_outline_that_colour(tiny_model, threshold, call):
    img, truth = synth_field(seed=2, wbc=5, touching_pairs=1, border_cells=1)
    seg = segment_field(img, "f.png")
    fc = classify_field([tiny_model], img, "f.png", 32, DecisionRule(threshold=threshold, band=0.0))
    assert fc.error is None and len(fc.table) == len(seg.cells) >= 5
    assert list(fc.table["cell"]) == [c.number for c in seg.cells]
    assert [tuple(r) for r in fc.table[["x0", "y0", "x1", "y1"]].to_numpy()] == [c.box for c in seg.cells]
    assert list(fc.table["mask_area_px"]) == [c.mask_area for c in seg.cells]
    assert list(fc.table["cell_name"]) == [cell_name("f.png", c.number) for c in seg.cells]
    assert (fc.table["call"] == call).all()
    assert set(_outline_colours(fc, seg.labels).values()) == {CALL_COLOURS[call]}
    s = fc.summary
    assert s["cells_found"] == len(seg.cells) and s["assessed"] == len(seg.cells) and s["not_assessed"] == 0
    assert s["blasts"] == (len(seg.cells) if call == "blast" else 0)
    assert s["blast_fraction"] == (1.0 if call == "blast" else 0.0)
    assert s["cut_by_border"] == seg.dropped_at_border >= 1
    # the crops are what the model saw, one per cell
    assert set(fc.crops) == set(fc.table["cell_name"]) and all(c.shape == (32, 32, 3) for c in fc.crops.values())
    # outside the outlines and the numbers the field is untouched
    far = seg.labels == 0
    far[: img.shape[0] // 10] = False
    assert (fc.overlay[far] == img[far]).mean() > 0.97


def test_review_band_and_the_gate_set_the_other_two_states(tiny_model):
    img, _ = synth_field(seed=4, wbc=4)
    # a band of 0.5 flags every call for review
    fc = classify_field([tiny_model], img, "f.png", 32, DecisionRule(band=0.5))
    assert (fc.table["call"] == "review").all() and fc.summary["review"] == len(fc.table)

    class RefuseAll:  # an image gate that refuses every crop
        def check(self, _img):
            return "colour"

    class Gate:
        image, novelty = RefuseAll(), None

    fc = classify_field([tiny_model], img, "f.png", 32, DecisionRule(), gate=Gate())
    assert (fc.table["call"] == "not assessed").all() and fc.summary["assessed"] == 0
    assert fc.table["ood_reason"].str.contains("colours outside").all()
    assert np.isnan(fc.summary["blast_fraction"])


def test_call_of_covers_the_four_states():
    assert call_of({"out_of_distribution": True, "uncertain": None, "prediction": None}) == "not assessed"
    assert call_of({"out_of_distribution": False, "uncertain": True, "prediction": "all"}) == "review"
    assert call_of({"out_of_distribution": False, "uncertain": False, "prediction": "all"}) == "blast"
    assert call_of({"out_of_distribution": False, "uncertain": False, "prediction": "hem"}) == "normal"


def test_fields_without_cells_and_bad_images_say_why(tiny_model):
    blank = np.full((400, 500, 3), BACKGROUND, np.uint8)
    fc = classify_field([tiny_model], blank, "blank.png", 32)
    assert fc.table.empty and "no white cells" in fc.error and fc.overlay is None
    small = np.full((100, 120, 3), 200, np.uint8)
    fc = classify_field([tiny_model], small, "small.png", 32)
    assert "too small" in fc.error and "small.png" in fc.error


def test_a_cnmc_tile_given_as_a_field_is_one_cell(tiny_model, cell_dir):
    from core.imageio import read_image

    tile = read_image(sorted(Path(cell_dir).glob("*.bmp"))[0])
    fc = classify_field([tiny_model], tile, "tile.bmp", 32)
    assert len(fc.table) == 1 and fc.summary["kind"] == "single cell"


def test_read_image_takes_arrays_and_refuses_wrong_ones():
    from core.imageio import ImageReadError, read_image

    a = np.zeros((5, 6, 3), np.uint8)
    assert read_image(a) is a
    with pytest.raises(ImageReadError, match="RGB uint8"):
        read_image(np.zeros((5, 6), np.float32), name="x")
