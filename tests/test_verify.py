"""The pathologist's loop on a smear upload: every photo not on black tried as a field, the verification view
(decisions stored with who and when, seen from another session, never lost when two people verify one cell),
the verified read-out against hand-counted values, the report and exports from the page."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_dashboard import _png, field_app  # noqa: E402,F401 - field_app: the fixture

from core.smear.verify import apply_verification, sample_key, verified_readout  # noqa: E402


def _cells() -> pd.DataFrame:
    return pd.DataFrame({
        "field": ["a.png"] * 4 + ["b.png"] * 2, "cell": [1, 2, 3, 4, 1, 2],
        "cell_name": ["a_cell01.png", "a_cell02.png", "a_cell03.png", "a_cell04.png", "b_cell01.png", "b_cell02.png"],
        "prediction": ["all", "hem", "hem", None, "hem", "all"],
        "prob_all_calibrated": [0.9, 0.2, 0.4, np.nan, 0.1, 0.8], "uncertain": [False, False, True, None, False, False],
        "out_of_distribution": [False, False, False, True, False, False],
        "ood_reason": [None, None, None, "novel", None, None], "error": [None] * 6})


def test_verified_readout_counts_by_hand():
    """a: blast confirmed, a normal re-classed blast, a normal left, a refused cell verified normal -> 4 judged,
    2 blasts; b: its blast is not a white cell -> 1 white cell, 0 blasts; pooled 5 / 5 / 2 (40%)."""
    d = {"a_cell01.png": "confirm", "a_cell02.png": "blast", "a_cell04.png": "normal",
         "b_cell02.png": "not a white cell"}
    out = verified_readout(_cells(), d, ["a.png", "b.png"]).set_index("field")
    assert out.loc["a.png", ["white_cells", "judged", "blasts", "verified", "removed"]].tolist() == [4, 4, 2, 3, 0]
    assert out.loc["b.png", ["white_cells", "judged", "blasts", "verified", "removed"]].tolist() == [1, 1, 0, 1, 1]
    assert out.loc["b.png", "call"] == "no blasts" and out.loc["a.png", "call"] == "blasts"
    pooled = out.loc["all fields"]
    assert pooled[["white_cells", "judged", "blasts", "verified", "removed"]].tolist() == [5, 5, 2, 4, 1]
    assert pooled["blast_fraction"] == 2 / 5
    unverified = verified_readout(_cells(), {}, ["a.png", "b.png"]).set_index("field")
    assert unverified.loc["all fields", ["white_cells", "judged", "blasts", "verified"]].tolist() == [6, 5, 2, 0]


def test_unsure_cells_are_not_judged_and_sample_keys_ignore_order():
    t = apply_verification(_cells(), {"a_cell01.png": "unsure"})
    row = t.set_index("cell_name").loc["a_cell01.png"]
    assert row["prediction"] is None and "unsure" in row["ood_reason"]
    assert sample_key(["x", "y"]) == sample_key(["y", "x"]) != sample_key(["x"])


def _fields():
    from core.smear.synthetic_fields import synth_field

    dense, _ = synth_field(seed=1, wbc=6, touching_pairs=0, border_cells=0)
    sparse, _ = synth_field(seed=2, wbc=1, touching_pairs=0, border_cells=0)
    return [("dense.png", _png(dense), "image/png"), ("sparse.png", _png(sparse), "image/png")]


def _reviewer(at, name: str):
    at.sidebar.text_input(key="reviewer").set_value(name).run()
    assert not at.exception, at.exception


def _press(at, label: str):
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception


def test_sparse_and_dense_photos_read_as_fields_and_verified_across_sessions(field_app):
    """No toggle: a dense and a sparse smear photo each get a field read-out. A decision made in one session is
    seen in another (same photos); two people verifying the same cell both keep their record, and the page says
    they disagree; counts change as cells are verified."""
    from training.store import RunStore

    files = _fields()
    a = field_app()
    _reviewer(a, "Dr A")
    a.file_uploader(key="cells").set_value(files).run()
    assert not a.exception, a.exception
    readout = next(d.value for d in a.dataframe if "blast_fraction_low" in d.value.columns).set_index("field")
    assert {"dense.png", "sparse.png"} <= set(readout.index) and (readout["white_cells"] >= 1).all()
    assert not [w.value for w in a.warning if "no cell on a black background" in w.value]
    metrics = {m.label: m.value for m in a.metric}
    total = int(readout.loc["all fields", "white_cells"])
    assert metrics["Verified"] == f"0 / {total}"
    _press(a, "Normal")
    _press(a, "Confirm")
    metrics = {m.label: m.value for m in a.metric}
    assert metrics["Verified"] == f"2 / {total}"
    assert metrics["Blasts, verified"] == str(int(readout.loc["all fields", "blasts"]) - 1)  # every call a blast
    b = field_app()  # another session, the same photos
    _reviewer(b, "Dr B")
    b.file_uploader(key="cells").set_value(list(reversed(files))).run()  # order does not make another sample
    assert not b.exception, b.exception
    assert {m.label: m.value for m in b.metric}["Verified"] == f"2 / {total}"
    first = next(btn for btn in b.button if btn.key and btn.key.startswith("tile-"))
    first.click().run()  # the least certain cell: the one Dr A called normal
    _press(b, "Blast")
    assert any("verifiers disagree" in w.value for w in b.warning)
    import os

    hist = RunStore(os.environ["CNMC_RUNS_DIR"]).verifications()
    mine = hist[hist["cell_name"] == hist["cell_name"].iloc[0]]
    assert sorted(mine["verifier"]) == ["Dr A", "Dr B"] and set(mine["decision"]) == {"normal", "blast"}
    assert hist["sample"].nunique() == 1 and (hist["model"] == "tiny cell model").all()
    saved = Path(os.environ["CNMC_RUNS_DIR"]) / hist["crop"].iloc[0]
    assert saved.is_file()  # the cell's model input, kept for teaching


def test_report_and_geojson_from_the_page_hold_the_verified_counts(field_app):
    """The report (HTML and CSV) holds the typed sample id and the verified counts; the GeoJSON has one feature
    per white cell with its class, the verified one where a decision exists."""
    from dashboard import services
    from training.store import RunStore

    at = field_app()
    _reviewer(at, "Dr A")
    at.file_uploader(key="cells").set_value(_fields()[:1]).run()
    _press(at, "Normal")
    at.text_input(key="sample-id").set_value("S-2026-001")
    _press(at, "Set the sample id")
    assert at.text_input(key="sample-id").value == "S-2026-001"
    html = next(b for b in at.get("download_button") if b.proto.label.startswith("Download the report (HTML"))
    assert html is not None
    result = at.session_state["_cnmc_result"]
    import os

    ver = services.verification(os.environ["CNMC_RUNS_DIR"], services.sample_of(result))
    assert len(ver.decisions) == 1 and ver.verifiers == ["Dr A"]
    from dashboard.auth import Actor

    report = services.sample_report(result, "S-2026-001", ver, actor=Actor("Dr A", "admin", False))
    assert "S-2026-001" in report.html and "Dr A" in report.html and "Research use only" in report.html
    rows = pd.read_csv(__import__("io").StringIO(report.csv))
    verified = rows[(rows["stage"] == "verified") & (rows["field"] == "all fields")].iloc[0]
    pre = rows[(rows["stage"] == "pre-classified") & (rows["field"] == "all fields")].iloc[0]
    assert verified["verified"] == 1 and verified["blasts"] == pre["blasts"] - 1
    fc = result.fields[0]
    gj = json.loads(services.field_geojson(result, fc.name, ver.decisions))
    assert len(gj["features"]) == len(fc.table)
    classes = [f["properties"]["classification"]["name"] for f in gj["features"]]
    assert classes.count("normal") == 1 and classes.count("blast") == len(fc.table) - 1
    assert RunStore(os.environ["CNMC_RUNS_DIR"]).verifications()["verifier"].tolist() == ["Dr A"]
