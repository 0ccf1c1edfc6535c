"""Streamlit AppTest per page, uploads of the real sample cells and a corrupt file, and a whole flow."""
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from training.store import RunStore  # noqa: E402

pytestmark = pytest.mark.slow
APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


def app(monkeypatch, runs, demo, roots=None, model: str | None = "Completed run") -> AppTest:
    """The app's first page (Classify); `model` picks the Classify model source when the starter is offered."""
    monkeypatch.setenv("CNMC_RUNS_DIR", str(runs))
    monkeypatch.setenv("CNMC_DEMO_DATA", str(demo))
    monkeypatch.setenv("CNMC_DATA_ROOTS", str(roots or Path(runs) / "no-roots"))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    if model and at.radio and model in at.radio[0].options and at.radio[0].value != model:
        at.radio[0].set_value(model).run()
        assert not at.exception, at.exception
    return at


def plotly_array(value) -> np.ndarray:
    """A Plotly figure's array as sent to the browser (plain lists, or base64 typed arrays in Plotly 6)."""
    if isinstance(value, dict) and "bdata" in value:
        import base64

        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return arr.reshape([int(v) for v in str(shape).split(",")]) if shape else arr
    return np.asarray(value)


def sample_files(cell_dir):
    return [(p.name, p.read_bytes(), "image/bmp") for p in sorted((cell_dir).glob("*.bmp"))]


def demo_cells(data, n):
    """Synthetic cells like the demo model's training cells: inside its gate, so they get a class."""
    return [(p.name, p.read_bytes(), "image/bmp") for p in sorted(Path(data).rglob("UID_*.bmp"))[:n]]


def test_banner_and_empty_classify_offers_demo(monkeypatch, tmp_path, synth_small):
    at = app(monkeypatch, tmp_path / "runs", synth_small, model=None)
    assert "not a diagnostic device" in at.warning[0].value
    if len(at.radio[0].options) > 2:  # the starter is offered first: look at the user's own runs
        at.radio[0].set_value("Completed run").run()
        assert not at.exception, at.exception
    assert any("No trained model yet" in i.value for i in at.info)
    assert any(b.label == "Train the demo model" for b in at.button)


def test_classify_real_cells_and_a_corrupt_file(monkeypatch, demo_run, cell_dir):
    """Real cells with the default model: the shipped starter (trained on real cells) when present."""
    store, rid, data = demo_run
    at = app(monkeypatch, store.root, data, model=None)
    files = sample_files(cell_dir) + [("corrupt.bmp", b"BM" + b"\0" * 200, "image/bmp")]
    at.file_uploader(key="cells").set_value(files).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("corrupt.bmp:")
    table = at.dataframe[0].value
    assert len(table) == 7  # every readable file has a row: a class, or "not assessed" with the reason
    judged = table[~table["out_of_distribution"].astype(bool)]
    assert at.subheader[0].value.startswith(f"{len(judged)} cell")
    assert set(judged["prediction"]) <= {"all", "hem"} and judged["prob_blast"].between(0, 1).all()
    assert table.loc[table["out_of_distribution"].astype(bool), "ood_reason"].str.len().gt(0).all()
    assert table.set_index("file").loc["UID_h3_4_1_hem.bmp", "subject"] == "H3"
    if len(judged):
        assert any(s.value.startswith("Per subject") for s in at.subheader)  # names carry subject ids
    at.toggle[0].set_value(True).run()  # Grad-CAM overlays
    assert not at.exception, at.exception


def test_classify_200_files_in_one_upload(monkeypatch, demo_run, cell_dir):
    store, rid, data = demo_run
    at = app(monkeypatch, store.root, data)
    base = sample_files(cell_dir)
    files = [(f"{k:03d}_{n}", b, m) for k in range(29) for n, b, m in base][:200]
    at.file_uploader(key="cells").set_value(files).run()
    assert not at.exception, at.exception
    assert len(at.dataframe[0].value) == 200


def test_two_sessions_share_one_cached_model(monkeypatch, demo_run, cell_dir):
    from dashboard import services

    store, rid, data = demo_run
    calls = []
    real = services.load_run_bundle
    monkeypatch.setattr(services, "load_run_bundle", lambda *a: calls.append(a) or real(*a))
    import streamlit as st

    st.cache_resource.clear()
    files = demo_cells(data, 2)
    sessions = [app(monkeypatch, store.root, data) for _ in range(2)]
    for at in sessions:
        at.file_uploader(key="cells").set_value(files).run()
        assert not at.exception and at.subheader[0].value.startswith("2 cells classified")
    assert len(calls) == 1  # the second browser session reused the first one's model


def test_pages_render_for_a_completed_run(monkeypatch, demo_run):
    store, rid, data = demo_run
    at = app(monkeypatch, store.root, data)
    for page in ("pages/train.py", "pages/evaluate.py", "pages/misclassified.py", "pages/data.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
    # Data page: the report's Table 1 from the demo set, and no problems; counts checked against the files
    assert any("No problems" in s.value for s in at.success)
    truth = pd.read_csv(Path(data) / "synthetic_truth.csv")  # the generator's own record, not the indexer's
    labelled = truth[~truth["relpath"].str.contains("testing_data")]  # the final phase comes without labels
    per_class = labelled.groupby("label")["subject"].nunique()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Cells"] == str(len(list(Path(data).rglob("*.bmp")))) == str(len(truth))
    assert metrics["Subjects (all / hem)"] == f"{per_class['all']} / {per_class['hem']}"
    # Evaluate page: the figures it shows, recomputed here from the run's stored predictions and decision rule
    from sklearn.metrics import confusion_matrix, f1_score

    from core.decide.calibration import DecisionRule

    preds = pd.read_csv(store.run_dir(rid) / "predictions.csv")
    test = preds[preds["split"] == "test"]
    decided = DecisionRule.load(store.run_dir(rid) / "calibration.json").decide(test["prob_all"].to_numpy())
    y, yhat = test["label"].to_numpy(), decided["prediction"].to_numpy()
    at.switch_page("pages/evaluate.py").run()
    shown = {m.label: m.value for m in at.metric}
    assert shown["Weighted F1 (challenge)"] == f"{f1_score(y, yhat, average='weighted'):.3f}"
    assert shown["Accuracy"] == f"{(y == yhat).mean():.3f}"
    heat = plotly_array(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["z"])
    assert heat.tolist() == confusion_matrix(y, yhat, labels=["hem", "all"]).tolist()
    # Misclassified page: as many false positives / negatives as the rule makes on the test split
    at.switch_page("pages/misclassified.py").run()
    fp, fn = int(((y == "hem") & (yhat == "all")).sum()), int(((y == "all") & (yhat == "hem")).sum())
    assert any(f"{fp} false positives, {fn} false negatives" in c.value for c in at.caption)


def test_whole_flow_train_evaluate_misclassified(monkeypatch, tmp_path, synth_small):
    runs = tmp_path / "runs"
    at = app(monkeypatch, runs, synth_small)
    at.switch_page("pages/train.py").run()
    assert not at.exception, at.exception
    assert any("No runs yet" in i.value for i in at.info)
    # presets first: without a GPU the page proposes the one that finishes in minutes, and says how long here
    preset = next(s for s in at.selectbox if s.label == "Preset")
    assert preset.value == "quick_demo" and set(preset.options) >= {"starter", "report_solution_a", "challenge"}
    assert any("about a minute" in c.value for c in at.caption)
    assert any(i.value.startswith("About ") and "timed now" in i.value for i in at.info)  # no earlier run here
    nums = {n.label: n for n in at.number_input}
    assert nums["Input size (px)"].value == 64 and nums["Epochs"].value == 3  # the preset's values, visible
    nums["Input size (px)"].set_value(32)
    nums["Epochs"].set_value(2)
    nums["Batch"].set_value(16)
    nums["Cells per class per epoch"].set_value(48)
    nums["Learning rate"].set_value(1e-3)
    next(s for s in at.slider if s.label == "MixStyle probability").set_value(0.5)
    next(s for s in at.selectbox if s.label == "Architecture").set_value("efficientnet_b2")
    at.run()
    launch = lambda: next(b for b in at.button if b.label == "Launch training").click().run()  # noqa: E731
    launch()
    assert not at.exception and any("mixstyle is not supported" in e.value for e in at.error)  # refused first
    assert RunStore(runs).list_runs().empty
    next(s for s in at.selectbox if s.label == "Architecture").set_value("solution_a")
    at.run()
    launch()
    assert not at.exception, at.exception
    assert any("launched in the background" in s.value for s in at.success)
    store = RunStore(runs)
    rid = store.list_runs()["id"].iloc[0]
    end = time.time() + 240
    while store.get_run(rid)["status"] in ("queued", "running") and time.time() < end:
        time.sleep(1)
    run = store.get_run(rid)
    assert run["status"] == "completed", run["error"]
    assert run["config"]["image_size"] == 32 and run["config"]["epochs"] == 2 and run["config"]["mixstyle"] == 0.5
    at.run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 1  # the run's curves
    # the next estimate of the same shape comes from this run's measured speed
    assert any(i.value.startswith("About ") and f"measured: run {rid}" in i.value for i in at.info)
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 3  # confusion matrix, ROC, PR, reliability
    metrics = json.loads((store.run_dir(rid) / "metrics.json").read_text())
    assert metrics["provenance"]["split"] == "test"
    at.switch_page("pages/misclassified.py").run()
    assert not at.exception, at.exception
    errors = pd.read_csv(store.run_dir(rid) / "errors.csv")
    fp = int((errors["error"] == "false_positive").sum())
    fn = int((errors["error"] == "false_negative").sum())
    assert any(f"{fp} false positives, {fn} false negatives" in c.value for c in at.caption)


def test_decompression_bomb_upload_is_refused_alone(monkeypatch, demo_run, cell_dir):
    import io

    from PIL import Image

    store, rid, data = demo_run
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # 81 megapixels in a few kilobytes
    at = app(monkeypatch, store.root, data)
    at.file_uploader(key="cells").set_value([("bomb.png", buf.getvalue(), "image/png")] + demo_cells(data, 1)).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("bomb.png:") and "decompression bomb" in errors[0]
    assert at.subheader[0].value.startswith("1 cell classified")


def test_server_config_is_locked_down():
    import tomllib

    cfg = tomllib.loads((Path(APP).parent / ".streamlit" / "config.toml").read_text())["server"]
    assert cfg["address"] == "127.0.0.1" and cfg["enableXsrfProtection"] is True
    assert 0 < cfg["maxUploadSize"] <= 200


def test_classify_refuses_non_cells_and_keeps_an_audit_trail(monkeypatch, demo_run, cell_dir):
    """The demo run's gate (fitted at the end of its training) refuses a blank image; a photo-like one (not a
    cell on black) is tried as a smear field, where no white cell is found; every upload gets an audit record
    (name and SHA-256), downloadable as CSV."""
    import hashlib

    import numpy as np

    from core.data.imageio import encode_bmp

    store, rid, data = demo_run
    at = app(monkeypatch, store.root, data)
    cell = sorted(Path(data).rglob("UID_*.bmp"))[0]
    gradient = np.dstack([np.tile(np.linspace(40, 250, 300), (300, 1))] * 3).astype(np.uint8)
    files = [(cell.name, cell.read_bytes(), "image/bmp"),
             ("blank.bmp", encode_bmp(np.zeros((200, 200, 3), np.uint8)), "image/bmp"),
             ("photo.bmp", encode_bmp(gradient), "image/bmp")]
    at.file_uploader(key="cells").set_value(files).run()
    assert not at.exception, at.exception
    assert at.subheader[0].value.startswith("1 cell classified") and "1 not assessed" in at.subheader[0].value
    warnings = " ".join(w.value for w in at.warning)
    assert "blank.bmp: not assessed: no cell: the image is blank" in warnings
    assert "photo.bmp" not in at.dataframe[0].value["file"].tolist()  # a field, not a cell
    assert any("photo.bmp" in w.value for w in at.warning) and "Smear fields (1)" in [h.value for h in at.subheader]
    table = at.dataframe[0].value.set_index("file")
    assert table.loc["blank.bmp", "out_of_distribution"] and pd.isna(table.loc["blank.bmp", "prediction"])
    assert table.loc[cell.name, "prediction"] in ("all", "hem")
    trail = store.classifications()
    mine = trail[trail["file_name"].isin([f[0] for f in files])].drop_duplicates("file_name").set_index("file_name")
    assert mine.loc["blank.bmp", "out_of_distribution"] == 1 and mine.loc["blank.bmp", "source"] == "dashboard"
    assert mine.loc["photo.bmp", "out_of_distribution"] == 1  # the field without a white cell keeps its record
    assert mine.loc[cell.name, "file_sha256"] == hashlib.sha256(cell.read_bytes()).hexdigest()
    assert mine.loc[cell.name, "model"].startswith(f"run {rid}") and len(mine.loc[cell.name, "model_sha256"]) == 64
    assert any(b.label.startswith("Download the audit trail") for b in at.get("download_button"))
    # a rerun (any click on the page) shows the same calls again: the upload stays recorded once
    count = lambda: int(store.classifications()["file_name"].isin([f[0] for f in files]).sum())  # noqa: E731
    before = count()
    at.run()
    assert not at.exception, at.exception
    assert count() == before


def test_classify_defaults_to_the_starter_with_its_card(monkeypatch, tmp_path, synth_small, cell_dir):
    from core.decide.model_folder import STARTER_DIR

    if not (STARTER_DIR / "model.keras").exists():
        pytest.skip("no shipped starter model in models/starter")
    at = app(monkeypatch, tmp_path / "runs", synth_small, model=None)
    assert at.radio[0].value.startswith("Starter model")
    assert any("Model card" in e.label for e in at.expander)
    at.file_uploader(key="cells").set_value(sample_files(cell_dir)).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) == 7 and table["out_of_distribution"].notna().all()
    assert "starter" in " ".join(c.value for c in at.caption)


def test_classify_recognises_a_smear_field_and_calls_each_white_cell(monkeypatch, demo_run):
    """A field upload is recognised by the gate and segmented: summary, outlined field, the cells' table with
    boxes (CSV too), and an audit record per cell carrying the field's SHA-256; a plain cell beside it is
    classified as before."""
    import hashlib
    import io

    from PIL import Image

    from core.smear.segmentation import segment_field
    from core.smear.synthetic_fields import synth_field

    store, rid, data = demo_run
    img, _ = synth_field(seed=1, wbc=4, touching_pairs=1, border_cells=1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    field_bytes = buf.getvalue()
    cells = len(segment_field(img).cells)
    at = app(monkeypatch, store.root, data)
    files = [("smear.png", field_bytes, "image/png")] + demo_cells(data, 1)
    at.file_uploader(key="cells").set_value(files).run()
    assert not at.exception, at.exception
    assert at.subheader[0].value.startswith("1 cell classified")
    assert "smear.png" not in set(at.dataframe[0].value["file"])  # the field is not judged as one cell
    assert any(s.value == "Smear fields (1)" for s in at.subheader)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["White cells found"] == str(cells)
    table = next(d.value for d in at.dataframe if "mask_area_px" in d.value.columns)
    assert len(table) == cells and {"x0", "y0", "x1", "y1", "mask_area_px", "call"} <= set(table.columns)
    assert set(table["call"]) <= {"blast", "normal", "review", "not assessed"}
    assert any(b.label == "Download this field's cells (CSV)" for b in at.get("download_button"))
    trail = store.classifications()
    mine = trail[trail["file_name"].str.startswith("smear_cell")]
    assert len(mine) == cells and (mine["file_sha256"] == hashlib.sha256(field_bytes).hexdigest()).all()
    assert (mine["source"] == "dashboard field").all()


def test_classify_says_when_calls_used_the_subjects_other_cells(monkeypatch, demo_run):
    """A model whose rule has the per-subject correction: cells of one subject (UID_ names) are decided
    together, the table says which, and the page says what that assumes."""
    import dataclasses

    import streamlit as st

    from dashboard import services

    store, rid, data = demo_run
    real = services.load_run_bundle

    def corrected(*a):
        bundle = real(*a)
        return dataclasses.replace(bundle, rule=dataclasses.replace(bundle.rule, subject_weight=0.5))

    monkeypatch.setattr(services, "load_run_bundle", corrected)
    st.cache_resource.clear()
    at = app(monkeypatch, store.root, data)
    at.file_uploader(key="cells").set_value(demo_cells(data, 4)).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert "subject_corrected" in table.columns
    shared = table["subject"].map(table["subject"].value_counts()) > 1
    judged = ~table["out_of_distribution"].astype(bool)
    assert table.loc[judged, "subject_corrected"].astype(bool).tolist() == (shared[judged]).tolist()
    assert any("same subject's other uploaded cells" in i.value for i in at.info) == bool((shared & judged).any())
    st.cache_resource.clear()


def _tiny_bundle(threshold: float, description: str):
    """A tiny model whose rule makes every judged cell a blast (threshold 0) or normal (1): deterministic calls."""
    from core.nets.augmentation import AugmentSpec
    from core.decide.calibration import DecisionRule
    from core.nets.models import create_model
    from dashboard import services

    model = create_model("solution_a", 32, augment=AugmentSpec(), standardize=True, filters=(4, 4, 4, 4))
    return services.ModelBundle([model], DecisionRule(threshold=threshold, band=0.0, fitted_on="unit test"), 32,
                                description, model_sha256="0" * 64)


def _png(img) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def field_app(monkeypatch, tmp_path):
    """Classify with a tiny stand-in for the starter (threshold 0: every judged cell a blast) and no shipped smear
    model unless a test puts one in place; no trained run needed."""
    import streamlit as st

    import core.decide.model_folder as mf
    from dashboard import services

    monkeypatch.setattr(mf, "SMEAR_DIR", tmp_path / "no-smear")
    monkeypatch.setattr(services, "starter_available", lambda: True)
    monkeypatch.setattr(services, "load_starter_bundle", lambda: (_tiny_bundle(0.0, "tiny cell model"), "# card"))
    st.cache_resource.clear()
    yield lambda: app(monkeypatch, tmp_path / "runs", tmp_path / "demo", model=None)
    st.cache_resource.clear()


def test_classify_field_readout_per_field_and_pooled_with_bad_uploads(monkeypatch, field_app):
    """Uploads as fields: a smear field (blasts), a field with no white cell, a file that is not an image and one
    over the upload limit each get a read-out row (the bad ones: cannot judge, and why) and the rest goes on; the
    pooled read-out, the call with its colour and the blast cells, the CI, the legend and the model note show."""
    import numpy as np

    from core.smear.synthetic_fields import BACKGROUND, synth_field
    from dashboard import settings

    monkeypatch.setattr(settings, "max_upload_mb", lambda: 1)
    img, _ = synth_field(seed=1, wbc=3, touching_pairs=0, border_cells=0)
    blank = np.full((400, 500, 3), BACKGROUND, np.uint8)
    files = [("smear.png", _png(img), "image/png"), ("empty.png", _png(blank), "image/png"),
             ("broken.jpg", b"not an image", "image/jpeg"),
             ("huge.png", bytes(3 * 2**19), "image/png")]  # 1.5 MB
    at = field_app()
    next(t for t in at.toggle if t.label.startswith("Uploads are smear fields")).set_value(True).run()
    at.file_uploader(key="cells").set_value(files).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert "broken.jpg: not an image (unrecognised format)" in errors
    assert "huge.png: 1.5 MB, over the 1 MB upload limit per file" in errors
    assert any(s.value == "Smear fields (4)" for s in at.subheader)
    readout = next(d.value for d in at.dataframe if "blast_fraction_low" in d.value.columns)
    rows = readout.set_index("field")
    assert list(rows.index) == ["smear.png", "empty.png", "broken.jpg", "huge.png", "all fields"]
    assert rows.loc["smear.png", "call"] == "blasts" and rows.loc["smear.png", "judged"] >= 1
    assert rows.loc["empty.png", "call"] == "cannot judge" and "no white cells" in rows.loc["empty.png", "why"]
    assert rows.loc["broken.jpg", "why"] == "not an image (unrecognised format)"
    assert "over the 1 MB upload limit" in rows.loc["huge.png", "why"]
    assert rows.loc["all fields", "white_cells"] == rows.loc["smear.png", "white_cells"]
    assert (rows["model"].dropna() == "tiny cell model").all()
    markdown = " ".join(m.value for m in at.markdown)
    assert "All 4 fields of this upload, pooled" in markdown
    assert f"Call: **:red[blasts]**: {rows.loc['smear.png', 'why']}" in markdown and "Blast cells: 1" in markdown
    assert "Call: **:gray[cannot judge]**" in markdown and "not judged: outside what the model can judge" in markdown
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Judged"] == str(rows.loc["smear.png", "judged"])
    assert metrics["Blast fraction (95% CI)"].startswith("100% (")
    assert any("no shipped smear model is installed" in i.value for i in at.info)
    assert any(b.label == "Download the per-field read-out (CSV)" for b in at.get("download_button"))


def test_classify_sends_field_cells_to_the_smear_model_when_installed(monkeypatch, tmp_path, field_app):
    """The one rule: a smear field's cells go to models/smear/ (here a temporary folder in its place, whose rule
    calls nothing a blast) while single cells keep the chosen model (which would call every cell a blast)."""
    import core.decide.model_folder as mf
    from core.decide.model_folder import save_model_folder
    from core.smear.synthetic_fields import synth_field

    tiny = _tiny_bundle(1.0, "unused")
    save_model_folder(tmp_path / "smear", tiny.model, tiny.rule, {"name": "tiny-smear", "crop_margin": 0}, "# smear")
    monkeypatch.setattr(mf, "SMEAR_DIR", tmp_path / "smear")
    img, _ = synth_field(seed=1, wbc=3, touching_pairs=0, border_cells=0)
    at = field_app()
    smear_toggle = next(t for t in at.toggle if t.label.startswith("Judge field cells with the shipped smear"))
    assert smear_toggle.value is True
    next(t for t in at.toggle if t.label.startswith("Uploads are smear fields")).set_value(True).run()
    at.file_uploader(key="cells").set_value([("smear.png", _png(img), "image/png")]).run()
    assert not at.exception, at.exception
    readout = next(d.value for d in at.dataframe if "blast_fraction_low" in d.value.columns).set_index("field")
    assert readout.loc["smear.png", "call"] == "no blasts" and readout.loc["smear.png", "blasts"] == 0
    assert readout.loc["smear.png", "model"].startswith("shipped smear model tiny-smear")
    assert any("judged by shipped smear model tiny-smear" in i.value for i in at.info)
    smear_toggle = next(t for t in at.toggle if t.label.startswith("Judge field cells with the shipped smear"))
    smear_toggle.set_value(False).run()  # switched off: the chosen model judges the field cells
    readout = next(d.value for d in at.dataframe if "blast_fraction_low" in d.value.columns).set_index("field")
    assert readout.loc["smear.png", "call"] == "blasts" and readout.loc["smear.png", "model"] == "tiny cell model"


def test_classify_offers_a_labs_refitted_smear_model_and_reads_fields_by_its_rule(monkeypatch, tmp_path, field_app):
    """A lab's refit (a new folder under models/ with its own field rule) appears beside the shipped smear model;
    picked, it judges the field cells (its name in the read-out's model column) and the read-out's call rule is
    the folder's own: here two blasts needed, so one blast cell makes `no blasts`."""
    import json

    import core.decide.model_folder as mf
    from core.decide.model_folder import save_model_folder
    from core.smear.synthetic_fields import synth_field

    models = tmp_path / "models"
    shipped, refit = _tiny_bundle(1.0, "unused"), _tiny_bundle(0.0, "unused")
    save_model_folder(models / "smear", shipped.model, shipped.rule, {"name": "tiny-smear", "crop_margin": 0}, "#")
    save_model_folder(models / "mylab", refit.model, refit.rule, {"name": "tiny-smear+mylab", "crop_margin": 0}, "#")
    (models / "mylab" / "field_rule.json").write_text(json.dumps({"min_blasts": 99, "min_blast_prob": None}))
    monkeypatch.setattr(mf, "MODELS_DIR", models)
    monkeypatch.setattr(mf, "SMEAR_DIR", models / "smear")
    img, _ = synth_field(seed=1, wbc=3, touching_pairs=0, border_cells=0)
    at = field_app()
    next(t for t in at.toggle if t.label.startswith("Uploads are smear fields")).set_value(True).run()
    picker = next(s for s in at.selectbox if s.label == "Smear model for field cells")
    assert picker.options[0].startswith("shipped smear model") and any("models/mylab" in o for o in picker.options)
    picker.set_value(next(o for o in picker.options if "models/mylab" in o)).run()
    at.file_uploader(key="cells").set_value([("smear.png", _png(img), "image/png")]).run()
    assert not at.exception, at.exception
    readout = next(d.value for d in at.dataframe if "blast_fraction_low" in d.value.columns).set_index("field")
    assert readout.loc["smear.png", "model"].startswith("smear model tiny-smear+mylab (mylab)")
    assert readout.loc["smear.png", "blasts"] >= 1 and readout.loc["smear.png", "call"] == "no blasts"
    assert any("at least 99 judged cells called blast" in c.value for c in at.caption)
