"""QuPath interop for smear fields (`core.smear.qupath`): cell outlines in the photo's pixels, one GeoJSON
FeatureCollection per field that is strict RFC 7946 (closed counter-clockwise rings, no NaN), classed by the call
or a person's verification, the crops as a zip, `predict --fields --geojson` writing one file per field with one
feature per white cell of the read-out, and a CLI summary of one line per field plus the pooled line with counts
and no cell lists."""
from __future__ import annotations

import io
import json
import math
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.decide.calibration import DecisionRule  # noqa: E402
from core.smear.fields import POOLED, classify_field, field_readout  # noqa: E402
from core.smear.qupath import (CLASS_COLOURS, cell_outline, crops_zip, field_geojson,  # noqa: E402
                               write_geojson)
from core.smear.segmentation import segment_field  # noqa: E402
from core.smear.synthetic_fields import BACKGROUND, synth_field  # noqa: E402


def _area(ring) -> float:
    r = np.asarray(ring, float)
    return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))


def check_geojson(doc: dict, width: int, height: int) -> None:
    """A strict reading of RFC 7946 for what we write: a FeatureCollection of Features, each with a Polygon whose
    rings are closed lists of at least 4 positions of two finite numbers (the exterior counter-clockwise), inside
    the photo; and the whole serialisable without NaN or Infinity."""
    json.dumps(doc, allow_nan=False)
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["properties"], dict)
        assert isinstance(f.get("id"), (str, int))
        g = f["geometry"]
        assert g["type"] == "Polygon" and isinstance(g["coordinates"], list) and len(g["coordinates"]) >= 1
        for k, ring in enumerate(g["coordinates"]):
            assert isinstance(ring, list) and len(ring) >= 4 and ring[0] == ring[-1]
            for p in ring:
                assert isinstance(p, list) and len(p) == 2
                assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
                assert 0 <= p[0] <= width and 0 <= p[1] <= height
            assert (_area(ring) > 0) == (k == 0)  # exterior counter-clockwise, holes clockwise


# --- the outline maths ------------------------------------------------------------------------------------------
def test_outline_of_a_filled_square_is_its_box_in_photo_pixels():
    # a 10x10 cell whose box is x 20..30, y 30..40 (x1, y1 exclusive, as SegmentedCell.box): its pixel edges
    ring = cell_outline(np.ones((10, 10), bool), (20, 30, 30, 40))
    assert ring == [[20.0, 30.0], [30.0, 30.0], [30.0, 40.0], [20.0, 40.0], [20.0, 30.0]]
    assert _area(ring) == 100.0  # closed, counter-clockwise in (x, y), exactly the mask's area
    # one pixel at (col 5, row 7) spans [5, 6) x [7, 8)
    assert cell_outline(np.ones((1, 1), bool), (5, 7, 6, 8)) == [[5.0, 7.0], [6.0, 7.0], [6.0, 8.0], [5.0, 8.0],
                                                                 [5.0, 7.0]]
    # a square with a hole: the outer boundary; an empty mask: the box
    holed = np.ones((6, 6), bool)
    holed[2:4, 2:4] = False
    assert cell_outline(holed, (0, 0, 6, 6)) == [[0.0, 0.0], [6.0, 0.0], [6.0, 6.0], [0.0, 6.0], [0.0, 0.0]]
    assert cell_outline(np.zeros((3, 4), bool), (1, 2, 5, 5)) == [[1.0, 2.0], [5.0, 2.0], [5.0, 5.0], [1.0, 5.0],
                                                                   [1.0, 2.0]]


def test_outline_of_a_disc_follows_its_pixel_edges_offset_by_the_box():
    yy, xx = np.mgrid[:41, :41]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 400  # radius 20 px, 1257 pixels, spans the whole 41x41 box
    box = (100, 200, 141, 241)
    exact = cell_outline(disc, box, tolerance=0)  # unsimplified: the pixel-edge staircase
    assert exact[0] == exact[-1] and _area(exact) == disc.sum() == 1257
    r = np.asarray(exact)
    assert (r.min(0) == [100, 200]).all() and (r.max(0) == [141, 241]).all()
    # the top row of the disc is the single pixel (col 20, row 0): its top edge is y = 200 from x = 120 to 121
    top = r[:-1][r[:-1, 1] == 200]  # the closing point repeats the first
    assert sorted(top[:, 0]) == [120.0, 121.0]
    ring = cell_outline(disc, box)  # simplified within ~1 px: far fewer points, the same shape
    s = np.asarray(ring)
    assert ring[0] == ring[-1] and 8 <= len(ring) < len(exact) / 4 and _area(ring) > 0
    assert abs(_area(ring) - 1257) / 1257 < 0.05
    assert np.all(s.min(0) >= [99, 199]) and np.all(s.max(0) <= [142, 242])
    assert np.all((s * 2) == np.round(s * 2))  # vertices are pixel corners or edge midpoints of the staircase
    # the largest piece wins over a speck
    two = np.zeros((10, 20), bool)
    two[1:9, 1:9] = True
    two[4, 15] = True
    assert cell_outline(two, (0, 0, 20, 10)) == [[1.0, 1.0], [9.0, 1.0], [9.0, 9.0], [1.0, 9.0], [1.0, 1.0]]


# --- a classified generated field -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from core.nets.models import create_model

    return create_model("solution_a", 32)


@pytest.fixture(scope="module")
def field():
    img, _ = synth_field(seed=2, wbc=5, touching_pairs=1, border_cells=1)
    return img, segment_field(img, "f.png")


class _RefuseAll:  # an image gate that refuses every crop
    def check(self, _img):
        return "colour"


class _Gate:
    image, novelty = _RefuseAll(), None


@pytest.mark.parametrize("rule, gate, name", [(DecisionRule(threshold=0.0, band=0.0), None, "blast"),
                                              (DecisionRule(threshold=1.0, band=0.0), None, "normal"),
                                              (DecisionRule(band=0.5), None, "review"),
                                              (DecisionRule(), _Gate(), "not judged")])
def test_field_geojson_is_strict_geojson_one_detection_per_cell_on_the_cell(tiny_model, field, rule, gate, name):
    from skimage.draw import polygon2mask

    img, seg = field
    h, w = img.shape[:2]
    fc = classify_field([tiny_model], img, "f.png", 32, rule, gate=gate)
    assert set(fc.outlines) == set(fc.table["cell"]) == {c.number for c in seg.cells}
    doc = field_geojson(fc)
    check_geojson(doc, w, h)
    feats = doc["features"]
    assert len(feats) == len(fc.table) >= 5
    assert len({f["id"] for f in feats}) == len(feats) and doc == field_geojson(fc)  # stable, unique ids
    for f, row, cell in zip(feats, fc.table.to_dict("records"), seg.cells):
        p = f["properties"]
        assert p["objectType"] == "detection" and p["name"] == row["cell_name"]
        assert p["classification"] == {"name": name, "color": list(CLASS_COLOURS[name])}
        assert p["measurements"]["Cell number"] == cell.number
        prob = row["prob_all_calibrated"]
        if prob is None or not np.isfinite(prob):
            assert "P(blast) calibrated" not in p["measurements"]  # JSON has no NaN
        else:
            assert p["measurements"]["P(blast) calibrated"] == pytest.approx(prob)
        # the outline is the cell where the photo has it: its box, and the cell's own pixels
        ring = np.asarray(f["geometry"]["coordinates"][0])
        x0, y0, x1, y1 = cell.box
        assert np.all(np.abs(ring.min(0) - [x0, y0]) <= 1) and np.all(np.abs(ring.max(0) - [x1, y1]) <= 1)
        # pixel (col, row) centres at (col + 0.5, row + 0.5): rasterised on that grid, the polygon is the cell
        inside = polygon2mask((h, w), ring[:, ::-1] - 0.5)
        cell_px = seg.labels == cell.number
        assert (inside & cell_px).sum() / (inside | cell_px).sum() > 0.9
    if name == "not judged":
        assert all("P(blast) calibrated" not in f["properties"]["measurements"] for f in feats)


def test_a_decision_overrides_the_class(tiny_model, field, tmp_path):
    img, _ = field
    fc = classify_field([tiny_model], img, "f.png", 32, DecisionRule(threshold=0.0, band=0.0))  # every cell: blast
    names = list(fc.table["cell_name"])
    decisions = {names[0]: "normal", names[1]: "not a white cell", names[2]: "unsure", names[3]: "confirm",
                 "other_cell99.png": "normal"}
    doc = field_geojson(fc, decisions)
    got = [f["properties"]["classification"]["name"] for f in doc["features"]]
    assert got == ["normal", "not a white cell", "unsure", "blast"] + ["blast"] * (len(names) - 4)
    assert doc["features"][1]["properties"]["classification"]["color"] == list(CLASS_COLOURS["not a white cell"])
    assert doc["features"][0]["properties"]["decision"] == "normal"
    path = write_geojson(fc, tmp_path / "out", decisions)
    assert path == tmp_path / "out" / "f.geojson"
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    with pytest.raises(ValueError):  # an unknown decision is refused, never silently exported
        field_geojson(fc, {names[0]: "maybe"})


def test_a_field_without_cells_is_an_empty_collection_and_nan_never_reaches_the_file(tmp_path):
    from core.smear.fields import FieldCalls

    empty = FieldCalls("blank.png", pd.DataFrame(), {}, None, {})
    assert field_geojson(empty) == {"type": "FeatureCollection", "features": []}
    # a hand-made table without outlines: placed by its box; NaN P(blast) left out; no prediction -> not judged
    table = pd.DataFrame({"field": "g.png", "cell": [1, 2], "x0": [10, 50], "y0": [10, 60], "x1": [30, 80],
                          "y1": [25, 90], "prediction": ["all", None], "prob_all_calibrated": [0.9, float("nan")],
                          "uncertain": [False, None], "out_of_distribution": [False, False]})
    doc = field_geojson(FieldCalls("dir/g.png", table, {}, None, {}))
    check_geojson(doc, 100, 100)
    a, b = doc["features"]
    assert a["geometry"]["coordinates"][0] == [[10.0, 10.0], [30.0, 10.0], [30.0, 25.0], [10.0, 25.0], [10.0, 10.0]]
    assert a["properties"]["name"] == "g_cell01.png" and a["properties"]["classification"]["name"] == "blast"
    assert b["properties"]["classification"]["name"] == "not judged"
    assert "P(blast) calibrated" not in b["properties"]["measurements"]
    assert json.loads(write_geojson(FieldCalls("dir/g.png", table, {}, None, {}), tmp_path).read_text()) == doc


def test_crops_zip_round_trips():
    from PIL import Image

    rng = np.random.default_rng(0)
    crops = {"f_cell01.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             "../../evil/f_cell02.png": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
             "a b:c": np.zeros((8, 8, 3), np.uint8), "dir/f_cell01.png": np.full((4, 4, 3), 7, np.uint8)}
    data = crops_zip(crops)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert len(names) == len(set(names)) == 4
        assert all("/" not in n and "\\" not in n and ".." not in n and n.endswith(".png") for n in names)
        got = [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]
    assert names[0] == "f_cell01.png" and names[1] == "f_cell02.png"
    for arr, want in zip(got, crops.values()):
        assert np.array_equal(arr, want)
    assert zipfile.ZipFile(io.BytesIO(crops_zip({}))).namelist() == []


# --- the CLI -----------------------------------------------------------------------------------------------------
def _tiny_folder(path: Path) -> Path:
    from core.decide.model_folder import save_model_folder
    from core.nets.augmentation import AugmentSpec
    from core.nets.models import create_model

    model = create_model("solution_a", 32, augment=AugmentSpec(), standardize=True, filters=(4, 4, 4, 4))
    card = {"name": "tiny-smear", "input": {"size": 32, "crop_margin": 0}}
    return save_model_folder(path, model, DecisionRule(threshold=0.0, band=0.0, fitted_on="unit test"), card,
                             "# tiny smear model\n")


def _summary_lines(printed: str) -> list[str]:
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("fields ("))
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        out.append(line.strip())
    return out


def test_predict_fields_geojson_writes_one_file_per_read_field(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import core.decide.model_folder as mf
    from training.cli import fields_csv_path, main

    monkeypatch.setattr(mf, "SMEAR_DIR", _tiny_folder(tmp_path / "smear"))
    folder = tmp_path / "fields"
    folder.mkdir()
    sizes = {}
    for seed, stem in ((5, "smear_a"), (7, "smear_b")):
        img, _ = synth_field(seed=seed, wbc=3, touching_pairs=0, border_cells=0)
        Image.fromarray(img).save(folder / f"{stem}.png")
        sizes[f"{stem}.png"] = img.shape[1], img.shape[0]
    Image.fromarray(np.full((400, 500, 3), BACKGROUND, np.uint8)).save(folder / "blank.png")
    sizes["blank.png"] = 500, 400
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "calls.csv"
    rc = main(["predict", "smear", str(folder), "--fields", str(tmp_path / "crops"), "--out", str(out),
               "--geojson", str(tmp_path / "qupath"), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    readout = pd.read_csv(fields_csv_path(out))
    rows = readout.assign(name=readout["field"].map(lambda f: Path(f).name)).set_index("name")
    assert sorted(p.name for p in (tmp_path / "qupath").iterdir()) == ["blank.geojson", "smear_a.geojson",
                                                                      "smear_b.geojson"]  # broken.jpg: unread
    cells = pd.read_csv(out)
    for name, (w, h) in sizes.items():
        doc = json.loads((tmp_path / "qupath" / f"{Path(name).stem}.geojson").read_text())
        check_geojson(doc, w, h)
        assert len(doc["features"]) == rows.loc[name, "white_cells"]
        mine = cells[cells["field"].map(lambda f: Path(f).name) == name]
        assert [f["properties"]["measurements"]["Cell number"] for f in doc["features"]] == list(mine["cell"])
        assert {f["properties"]["classification"]["name"] for f in doc["features"]} <= {"blast"}  # threshold 0
    assert rows.loc["smear_a.png", "white_cells"] >= 1 and rows.loc["blank.png", "white_cells"] == 0
    printed = capsys.readouterr().out
    assert "3 GeoJSON files written" in printed
    lines = _summary_lines(printed)
    assert [line.split(":")[0] for line in lines] == ["blank.png", "broken.jpg", "smear_a.png", "smear_b.png", POOLED]
    assert not any(re.search(r"_cell\d|\.png:\d|blast cells", line) for line in lines)
    assert f"{POOLED}: blasts: {rows.loc[POOLED, 'white_cells']} white cells" in lines[-1]


def test_geojson_needs_fields(tmp_path, capsys):
    from training.cli import main

    assert main(["predict", "starter", str(tmp_path), "--geojson", str(tmp_path / "q")]) == 2
    assert "--geojson applies to smear fields" in capsys.readouterr().err


def test_the_summary_is_one_line_per_field_and_the_pooled_line_without_cell_names(capsys):
    """54 photos with ~5 blasts each: before, the pooled line listed every blast cell (253 names on one line)."""
    from training.cli import _write_field_readout

    fields = [f"photos/im{k:03d}.jpg" for k in range(54)]
    cells = pd.DataFrame([{"field": f, "cell": c, "prediction": "all" if c <= 5 else "hem",
                           "prob_all_calibrated": 0.9 if c <= 5 else 0.1, "uncertain": False, "ood_reason": None,
                           "error": None} for f in fields for c in range(1, 8)])
    _write_field_readout(cells, fields, {}, "tiny model", None)
    lines = _summary_lines(capsys.readouterr().out)
    assert len(lines) == 55 and lines[-1].startswith(f"{POOLED}: blasts: 378 white cells, 378 judged, 270 blasts, "
                                                     "blast fraction 71% (95% CI")
    assert lines[0].startswith("im000.jpg: blasts: 7 white cells, 7 judged, 5 blasts, blast fraction 71% (95% CI")
    assert all(len(line) < 200 and not re.search(r"\.jpg:\d|blast cells|, \d+, \d+", line) for line in lines)
    # the cell lists stay in the read-out table the CSV is written from
    table = field_readout(cells, fields)
    assert table.loc[0, "blast_cells"] == "1, 2, 3, 4, 5" and table.iloc[-1]["blast_cells"].count(":") == 270
