"""A smear field to per-cell calls (`core.smear.fields`): every white cell found gets a row with its box and a call,
outlines coloured by that call, a consistent per-field summary, and clear answers for fields without cells; the
per-field read-out (counts, blast fraction with its Wilson interval, the call and why) and its pooled row, and
`predict --fields` writing it as OUT_fields.csv, with `smear` resolved to the shipped folder."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.decide.calibration import DecisionRule  # noqa: E402
from core.smear.fields import (CALL_COLOURS, POOLED, READOUT_COLUMNS, CallRule, call_of, cell_name,  # noqa: E402
                         classify_field, field_readout, fields_readout, wilson_interval)
from core.smear.segmentation import segment_field  # noqa: E402
from core.smear.synthetic_fields import BACKGROUND, synth_field  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    from core.nets.models import create_model

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
    from core.data.imageio import read_image

    tile = read_image(sorted(Path(cell_dir).glob("*.bmp"))[0])
    fc = classify_field([tiny_model], tile, "tile.bmp", 32)
    assert len(fc.table) == 1 and fc.summary["kind"] == "single cell"


def test_read_image_takes_arrays_and_refuses_wrong_ones():
    from core.data.imageio import ImageReadError, read_image

    a = np.zeros((5, 6, 3), np.uint8)
    assert read_image(a) is a
    with pytest.raises(ImageReadError, match="RGB uint8"):
        read_image(np.zeros((5, 6), np.float32), name="x")


# --- the read-out: per field, pooled, the call rule, and the CLI's _fields.csv ------------------------------------
def _cells(field, preds, probs, review=None, ood=None):
    """A hand-made per-cell table as `classify_field` / `predict --fields` give it."""
    n = len(preds)
    return pd.DataFrame({"field": field, "cell": range(1, n + 1), "prediction": preds,
                         "prob_all_calibrated": probs, "uncertain": review or [False] * n,
                         "ood_reason": ood or [None] * n, "error": None})


def test_wilson_interval_against_hand_computed_values():
    # 3 of 12, z = 1.959964: p = 0.25, z²/n = 0.320122, centre = (0.25 + 0.160061) / 1.320122 = 0.310624,
    # half = 1.959964 / 1.320122 * sqrt(0.25 * 0.75 / 12 + 3.841459 / 576) = 1.484682 * 0.149315 = 0.221685
    low, high = wilson_interval(3, 12)
    assert low == pytest.approx(0.088942, abs=2e-6) and high == pytest.approx(0.532305, abs=2e-6)
    # 0 of 5: low 0, high = (z²/n) / (1 + z²/n) = 0.768292 / 1.768292 = 0.434482
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.434482), abs=2e-6)
    assert wilson_interval(5, 5) == pytest.approx((1 - 0.434482, 1.0), abs=2e-6)  # symmetric
    assert all(np.isnan(wilson_interval(0, 0)))


def test_call_rule_on_hand_made_fields_and_the_pooled_row_is_the_sums():
    cells = pd.concat([
        _cells("a.png", ["all", "hem", "hem", "all"], [0.9, 0.1, 0.2, 0.55], review=[False, False, False, True]),
        _cells("b.png", ["hem"] * 3, [0.1, 0.2, 0.3]),
        _cells("c.png", [None] * 6 + ["hem"], [np.nan] * 6 + [0.2], ood=["unlike any training cell"] * 6 + [None])])
    problems = {"d.png": "d.png: no white cells found (the image is nearly uniform)",
                "e.jpg": "e.jpg: not an image (unrecognised format)"}
    r = field_readout(cells, ["a.png", "b.png", "c.png", "d.png", "e.jpg"], problems, model="m")
    assert list(r.columns) == READOUT_COLUMNS and list(r["field"]) == ["a.png", "b.png", "c.png", "d.png",
                                                                         "e.jpg", POOLED]
    a, b, c, d, e, pooled = r.to_dict("records")
    assert (a["call"], a["white_cells"], a["judged"], a["blasts"], a["review"]) == ("blasts", 4, 4, 2, 1)
    assert a["blast_cells"] == "1, 4" and a["why"].startswith("2 blasts among 4 judged cells")
    assert "review band" in a["why"] and a["blast_fraction"] == 0.5
    assert (a["blast_fraction_low"], a["blast_fraction_high"]) == pytest.approx(wilson_interval(2, 4))
    assert b["call"] == "no blasts" and b["why"] == "no blast among 3 judged cells" and b["blast_cells"] == ""
    assert c["call"] == "cannot judge" and c["judged"] == 1  # 1 of 7 judged: under half
    assert c["why"].startswith("only 1 of 7 white cells could be judged") and "unlike any training cell" in c["why"]
    assert d["call"] == e["call"] == "cannot judge" and d["white_cells"] == 0
    assert d["why"] == "no white cells found (the image is nearly uniform)"
    assert e["why"] == "not an image (unrecognised format)" and np.isnan(e["blast_fraction"])
    # pooled: the counts are the fields' sums; fraction, interval and call those of the sums
    per_field = r[r["field"] != POOLED]
    for col in ("white_cells", "judged", "review", "blasts"):
        assert pooled[col] == per_field[col].sum()
    assert pooled["blast_fraction"] == 2 / 8
    assert (pooled["blast_fraction_low"], pooled["blast_fraction_high"]) == pytest.approx(wilson_interval(2, 8))
    assert pooled["call"] == "blasts" and pooled["blast_cells"] == "a.png:1, a.png:4"
    assert "3 of the 5 fields could not be judged alone" in pooled["why"] and set(r["model"]) == {"m"}


def test_call_rule_thresholds_change_the_call():
    cells = _cells("a.png", ["all", "hem", "hem", "all"], [0.9, 0.1, 0.2, 0.55])
    strict = field_readout(cells, rule=CallRule(min_blast_prob=0.8), pooled=False).iloc[0]
    assert strict["call"] == "blasts" and strict["blast_cells"] == "1" and strict["blasts"] == 2
    stricter = field_readout(cells, rule=CallRule(min_blast_prob=0.95), pooled=False).iloc[0]
    assert stricter["call"] == "no blasts" and "none with calibrated P(blast) ≥ 0.95" in stricter["why"]
    two = field_readout(cells, rule=CallRule(min_blasts=3), pooled=False).iloc[0]
    assert two["call"] == "no blasts" and "fewer than the 3" in two["why"]
    few = field_readout(cells, rule=CallRule(min_judged=5), pooled=False).iloc[0]
    assert few["call"] == "cannot judge" and "fewer than the 5" in few["why"]
    half = _cells("h.png", ["hem", None], [0.1, np.nan], ood=[None, "cell size outside the range"])
    assert field_readout(half, pooled=False).iloc[0]["call"] == "no blasts"  # 1 of 2: exactly half judged
    assert field_readout(half, rule=CallRule(min_judged_fraction=0.6), pooled=False).iloc[0]["call"] == "cannot judge"
    assert "min_blasts" not in CallRule().describe() and "50%" in CallRule().describe()


class _Refuse:
    """An image gate refusing every crop after the first `keep` (a deterministic 'outside the model's range')."""

    def __init__(self, keep: int = 0):
        self.keep, self.seen = keep, 0

    def check(self, _img):
        self.seen += 1
        return None if self.seen <= self.keep else "colour"


def _gate(keep):
    class Gate:
        image, novelty = _Refuse(keep), None

    return Gate()


def test_readout_of_generated_fields_blasts_no_blasts_and_cannot_judge(tiny_model):
    """Generated fields with known white cells through the real segmentation and `classify_field`; the rule
    (threshold 0: every judged cell a blast; 1: none) and a refusing gate make each call deterministic."""
    img_a, _ = synth_field(seed=2, wbc=4, touching_pairs=0, border_cells=0)
    img_b, _ = synth_field(seed=3, wbc=4, touching_pairs=0, border_cells=0)
    img_c, _ = synth_field(seed=4, wbc=4, touching_pairs=0, border_cells=0)
    blank = np.full((400, 500, 3), BACKGROUND, np.uint8)
    a = classify_field([tiny_model], img_a, "a.png", 32, DecisionRule(threshold=0.0, band=0.0), model="tiny")
    b = classify_field([tiny_model], img_b, "b.png", 32, DecisionRule(threshold=1.0, band=0.0), model="tiny")
    c = classify_field([tiny_model], img_c, "c.png", 32, DecisionRule(band=0.0), gate=_gate(keep=1), model="tiny")
    d = classify_field([tiny_model], blank, "blank.png", 32, model="tiny")
    r = fields_readout([a, b, c, d], failed={"huge.png": "huge.png: image too large (9000x9000 pixels)"})
    rows = r.set_index("field")
    assert list(r["field"]) == ["a.png", "b.png", "c.png", "blank.png", "huge.png", POOLED]
    assert rows.loc["a.png", "call"] == "blasts" and rows.loc["a.png", "blasts"] == len(a.table) >= 4
    assert rows.loc["a.png", "blast_cells"] == ", ".join(str(n) for n in a.table["cell"])
    assert rows.loc["b.png", "call"] == "no blasts" and rows.loc["b.png", "judged"] == len(b.table)
    assert rows.loc["c.png", "call"] == "cannot judge" and rows.loc["c.png", "judged"] == 1
    assert rows.loc["c.png", "why"].startswith(f"only 1 of {len(c.table)} white cells could be judged")
    assert "colours outside" in rows.loc["c.png", "why"]
    assert rows.loc["blank.png", "call"] == "cannot judge" and "no white cells" in rows.loc["blank.png", "why"]
    assert rows.loc["huge.png", "why"] == "image too large (9000x9000 pixels)"
    assert (a.table["model"] == "tiny").all() and rows.loc["a.png", "model"] == "tiny"
    pooled = rows.loc[POOLED]
    for col in ("white_cells", "judged", "review", "blasts"):
        assert pooled[col] == rows.drop(index=POOLED)[col].sum()
    assert pooled["call"] == "blasts"
    lo, hi = wilson_interval(int(pooled["blasts"]), int(pooled["judged"]))
    assert (pooled["blast_fraction_low"], pooled["blast_fraction_high"]) == pytest.approx((lo, hi))


def _field_files(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    img, _ = synth_field(seed=5, wbc=3, touching_pairs=0, border_cells=0)
    Image.fromarray(img).save(folder / "smear_a.png")
    Image.fromarray(np.full((400, 500, 3), BACKGROUND, np.uint8)).save(folder / "blank.png")
    (folder / "broken.jpg").write_bytes(b"not an image")


def _tiny_folder(path: Path, threshold: float, margin: int = 0) -> Path:
    from core.nets.augmentation import AugmentSpec
    from core.decide.model_folder import save_model_folder
    from core.nets.models import create_model

    model = create_model("solution_a", 32, augment=AugmentSpec(), standardize=True, filters=(4, 4, 4, 4))
    card = {"name": "tiny-smear", "input": {"size": 32, "crop_margin": margin}}
    return save_model_folder(path, model, DecisionRule(threshold=threshold, band=0.0, fitted_on="unit test"),
                             card, "# tiny smear model\n")


def test_predict_smear_fields_writes_the_fields_csv(tmp_path, monkeypatch, capsys):
    """`predict smear … --fields` resolves `smear` to the shipped folder (here a temporary one in its place),
    reads its card's crop margin, and writes OUT_fields.csv: one row per field (a blank field and a bad file
    included, cannot judge, with why) and the pooled row."""
    import core.decide.model_folder as mf
    from training.cli import fields_csv_path, main
    from training.evaluate import crop_margin_of
    from training.store import RunStore

    monkeypatch.setattr(mf, "SMEAR_DIR", _tiny_folder(tmp_path / "smear", threshold=0.0))
    assert mf.is_model_folder("smear") and mf.folder_of("smear") == tmp_path / "smear"
    assert crop_margin_of("smear", RunStore(tmp_path / "runs")) == 0  # from the card's "input"
    _field_files(tmp_path / "fields")
    out = tmp_path / "calls.csv"
    rc = main(["predict", "smear", str(tmp_path / "fields"), "--fields", str(tmp_path / "crops"), "--out", str(out),
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    assert fields_csv_path(out) == tmp_path / "calls_fields.csv"
    readout = pd.read_csv(tmp_path / "calls_fields.csv", keep_default_na=False, na_values=[""])
    assert {"field", "white_cells", "judged", "blasts", "blast_fraction", "blast_fraction_low",
            "blast_fraction_high", "call", "why", "blast_cells", "model"} <= set(readout.columns)
    rows = readout.assign(name=readout["field"].map(lambda f: Path(f).name)).set_index("name")
    assert list(rows.index) == ["blank.png", "broken.jpg", "smear_a.png", POOLED]
    cells = pd.read_csv(out)
    n = len(cells)  # every white cell the segmentation found, each judged (no gate) and a blast (threshold 0)
    assert n >= 1 and set(cells["prediction"]) == {"all"}
    assert rows.loc["smear_a.png", "call"] == "blasts" and rows.loc["smear_a.png", "white_cells"] == n
    assert rows.loc["smear_a.png", "judged"] == rows.loc["smear_a.png", "blasts"] == n
    assert rows.loc["smear_a.png", "blast_cells"] == ", ".join(str(c) for c in cells["cell"])  # 1, 2, 3 (not 1.0)
    assert rows.loc["blank.png", "call"] == "cannot judge" and "no white cells" in rows.loc["blank.png", "why"]
    assert rows.loc["broken.jpg", "call"] == "cannot judge" and "not an image" in rows.loc["broken.jpg", "why"]
    assert rows.loc[POOLED, "white_cells"] == n and rows.loc[POOLED, "call"] == "blasts"
    assert rows["model"].str.contains("tiny-smear").all()
    printed = capsys.readouterr().out
    s = "s" if n > 1 else ""
    assert f"smear_a.png: blasts: {n} white cell{s}, {n} judged, {n} blast{s}, blast fraction 100%" in printed
    assert f"{n} blast{s} among {n} judged cell" in printed  # the why, after the counts
    assert "blank.png: cannot judge" in printed and "all fields: blasts" in printed


def test_predict_smear_without_the_folder_says_so(tmp_path, monkeypatch, capsys):
    import core.decide.model_folder as mf
    from training.cli import main

    monkeypatch.setattr(mf, "SMEAR_DIR", tmp_path / "absent")
    _field_files(tmp_path / "fields")
    assert main(["predict", "smear", str(tmp_path / "fields"), "--fields", str(tmp_path / "crops"),
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "the shipped smear model" in err and "is not installed" in err and str(tmp_path / "absent") in err
    assert not (tmp_path / "crops").exists()  # refused before any work


def test_the_model_for_the_input_notes(tmp_path, monkeypatch, capsys):
    """predict starter --fields suggests `smear` once it is installed; predict smear on single cells points
    back to the starter."""
    import core.decide.model_folder as mf
    from training.cli import _model_for_input_note

    monkeypatch.setattr(mf, "SMEAR_DIR", tmp_path / "absent")
    _model_for_input_note("starter", True)
    assert capsys.readouterr().out == ""
    (tmp_path / "smear").mkdir()
    (tmp_path / "smear" / "model.keras").write_bytes(b"")
    monkeypatch.setattr(mf, "SMEAR_DIR", tmp_path / "smear")
    _model_for_input_note("starter", True)
    assert "predict smear" in capsys.readouterr().out
    _model_for_input_note("smear", False)
    assert "use `starter`" in capsys.readouterr().out


def test_a_huge_bmp_is_refused_by_its_header_like_any_other_format():
    """C-NMC's BMP fast path obeys the same pixel limit as Pillow's formats (a field photo may be any format)."""
    import struct

    from core.data.imageio import ImageReadError, encode_bmp, read_image

    data = bytearray(encode_bmp(np.zeros((10, 10, 3), np.uint8)))
    struct.pack_into("<ii", data, 18, 9000, 9000)  # the header claims 81 megapixels
    with pytest.raises(ImageReadError, match=r"big.bmp: image too large \(9000x9000 pixels"):
        read_image(bytes(data), name="big.bmp")


def test_evaluating_a_model_folder_cuts_crops_with_its_cards_margin(tmp_path, monkeypatch, cell_dir):
    """`evaluate smear --data DIR` (any folder whose card says crop_margin 0) crops as the model was trained."""
    import training.evaluate as ev

    seen = []
    real = ev._cached_crops
    monkeypatch.setattr(ev, "_cached_crops", lambda *a, **kw: seen.append(kw.get("margin")) or real(*a, **kw))
    folder = _tiny_folder(tmp_path / "smear", threshold=0.5, margin=0)
    result = ev.evaluate_model_folder(str(folder), str(cell_dir), out_dir=tmp_path / "ev", n_boot=10,
                                      cache_dir=str(tmp_path / "cache"))
    assert seen == [0] and result["provenance"]["cells"] == 7
