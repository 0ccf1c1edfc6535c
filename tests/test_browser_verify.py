"""A real-browser test of a pathologist's loop on a smear upload: Debian's Chromium, driven by Playwright, uploads
two smear photos to Classify (no toggle touched), verifies five white cells with the keyboard only, then downloads
the printable report and the QuPath outlines and checks what they hold.

The app runs as `streamlit run` in a subprocess over an empty run store, so it uses what ships in the repo: the
starter model for single cells and the shipped smear model (`models/smear/`) for the field cells; no training."""
import csv
import io
import json
import math
import re
import time
import zipfile
from pathlib import Path

import pytest
from helpers import ARTIFACTS, CHROMIUM, FLAGS, serve_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]
# the five decisions, by key only, and the decision each key stands for (core.smear.verify.SHORTCUTS)
KEYS = ["n", "y", "b", "y", "x"]
DECISION = {"y": "confirm", "b": "blast", "n": "normal", "x": "not a white cell", "u": "unsure"}
SCRIPT_STATE = "document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState"
METRICS_JS = """els => els.map(e => [
    e.querySelector('[data-testid="stMetricLabel"]').innerText.trim(),
    e.querySelector('[data-testid="stMetricValue"]').innerText.trim()])"""


@pytest.fixture()
def smear_photos(tmp_path):
    """Two synthetic smear photos: a dense one (six white cells) and a sparse one (one)."""
    from PIL import Image

    from core.smear.synthetic_fields import synth_field

    out = []
    for name, wbc, seed in (("dense_field.png", 6, 11), ("sparse_field.png", 1, 12)):
        img, _ = synth_field(seed=seed, wbc=wbc, touching_pairs=0, border_cells=0)
        Image.fromarray(img).save(tmp_path / name)
        out.append(tmp_path / name)
    return out


@pytest.fixture()
def app_url(tmp_path):
    """The app over an empty run store of its own (the verifications land there): the shipped models, no run."""
    from core.decide.model_folder import SMEAR, shipped_available

    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian chromium is missing at {CHROMIUM} (make browser-deps)")
    if not shipped_available(SMEAR):
        pytest.skip("the shipped smear model (models/smear/) is not installed")
    runs = tmp_path / "runs"
    runs.mkdir()
    with serve_app(runs, tmp_path / "no-demo-data", tmp_path) as url:
        yield url


def _metric_list(page) -> list[tuple[str, str]]:
    """Every metric on the page, in page order: (label, value)."""
    return [tuple(m) for m in page.eval_on_selector_all('[data-testid="stMetric"]', METRICS_JS)]


def _metrics(page) -> dict[str, str]:
    return dict(_metric_list(page))


def _settled(page, timeout=60):
    """Wait until the app's script run is over (Streamlit marks its state on the app's root) and no element is
    left stale from the run before, then a moment more for the browser to draw the last of it (the buttons of a
    run can appear, and take their new props, just after the state says the run is over): a key pressed before a
    button with that shortcut is drawn is lost, and a download clicked on a button of the run before can fetch
    nothing or an old file."""
    done = f"{SCRIPT_STATE} === 'notRunning' && !document.querySelector('[data-stale=\"true\"]')"
    page.wait_for_function(done, timeout=timeout * 1000, polling=200)
    page.wait_for_timeout(800)
    page.wait_for_function(done, timeout=timeout * 1000, polling=200)


def _rerun_done(page, timeout=60):
    """After an input that reruns the script: wait for the run to start (a moment; it may be over already), then
    for it to end."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(SCRIPT_STATE + " !== 'notRunning'", timeout=3_000, polling=50)
    except PlaywrightTimeout:
        pass  # the run came and went between two polls, or is about to start: _settled waits for it either way
    _settled(page, timeout)


def _download(page, label: str, tries: int = 3) -> tuple[str, bytes]:
    """Click a download button and return (file name, bytes); the app reruns once a download is clicked, and this
    waits for that run to end. A click that brings no file (a deferred download clicked as a run replaced its
    file id: Streamlit logs "Deferred file ... not found" and the button shows an error for 5 s) is tried again
    once the page has settled."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    button = page.get_by_role("button", name=label, exact=True)
    for attempt in range(tries):
        _settled(page)
        try:
            with page.expect_download(timeout=15_000) as dl:
                button.click()
            data = Path(dl.value.path()).read_bytes()
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise
            print(f"no file from {label!r} (try {attempt + 1}); trying again")
            continue
        _rerun_done(page)
        return dl.value.suggested_filename, data
    raise AssertionError("unreachable")


def _wait_metric(page, label: str, value: str, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if _metrics(page).get(label) == value:
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"metric {label!r} never became {value!r}: {_metrics(page)}")


def _pre_call(page) -> tuple[str, str]:
    """The cell under the eye: (its name, its pre-classified call) from the decision panel's text."""
    text = page.get_by_text(re.compile(r"Pre-classified: ")).first.inner_text()
    m = re.search(r"^(\S+) · .*\nPre-classified: (blast|normal|review|not assessed)", text, re.S)
    assert m, text
    return m.group(1), m.group(2)


def _check_collection(doc: dict, where: str) -> list[dict]:
    """A FeatureCollection QuPath imports: each Feature a detection Polygon with closed rings of >= 4 numeric
    positions and a class with a name and a colour."""
    assert doc["type"] == "FeatureCollection", where
    for f in doc["features"]:
        assert f["type"] == "Feature", where
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and geom["coordinates"], (where, geom["type"])
        for ring in geom["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1], (where, ring[:2], ring[-1:])
            for pos in ring:
                assert len(pos) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in pos), pos
        props = f["properties"]
        assert props["objectType"] == "detection", (where, props)
        cls = props["classification"]
        assert isinstance(cls["name"], str) and cls["name"], (where, cls)
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"]), cls
    return doc["features"]


def _strict_json(data: bytes):
    def no_constant(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(data.decode("utf-8"), parse_constant=no_constant)


def test_verify_a_smear_sample_with_the_keyboard_and_download_report_and_geojson(app_url, smear_photos):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    names = [p.name for p in smear_photos]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.goto(app_url)
        page.get_by_text("Classify cells").wait_for(timeout=60_000)
        # local mode: the verifier's name goes in the sidebar
        reviewer = page.get_by_role("textbox", name="Reviewer", exact=True)
        reviewer.wait_for(timeout=30_000)
        reviewer.fill("Dr Test")
        reviewer.press("Enter")
        _rerun_done(page)
        # both photos, no toggle touched: each is taken as a smear field because it is not a cell on black
        fields_toggle = page.get_by_role("switch", name=re.compile("Uploads are smear fields"))
        if fields_toggle.count():
            assert not fields_toggle.is_checked()
        page.locator("input[type=file]").first.set_input_files([str(p) for p in smear_photos])
        head = page.get_by_text(re.compile(r"^Verify this sample: \d+ white cells? in \d+ smear photos?$"))
        head.wait_for(timeout=240_000)
        _settled(page, timeout=120)
        page.get_by_text("Verified", exact=True).wait_for(timeout=30_000)
        m = re.search(r"(\d+) white cells? in (\d+) smear photo", head.inner_text())
        n_cells, n_fields = int(m.group(1)), int(m.group(2))
        assert n_fields == 2, head.inner_text()
        assert n_cells >= len(KEYS) + 1, f"too few cells found to verify {len(KEYS)}: {head.inner_text()}"
        # a field read-out per photo: the section, and each photo's own block with its call and its counts
        page.get_by_text("Smear fields (2)", exact=True).wait_for(timeout=10_000)
        for name in names:
            assert page.locator("strong", has_text=re.compile(rf"^{re.escape(name)}$")).count() >= 1, name
        assert page.get_by_text("All 2 fields of this upload, pooled").count() == 1
        assert page.get_by_text(re.compile(r"^Call: ")).count() == 3  # pooled, then each photo's own
        _, fields_csv = _download(page, "Download the per-field read-out (CSV)")  # the read-out table's rows
        rows = list(csv.DictReader(io.StringIO(fields_csv.decode("utf-8"))))
        assert [r["field"] for r in rows] == [*names, "all fields"], rows
        assert all(r["why"] and "black background" not in r["why"] for r in rows), rows
        assert page.get_by_text("no cell on a black background").count() == 0
        assert page.get_by_text(re.compile(r"cells? classified")).count() == 0  # nothing read as a single cell
        assert page.locator('[data-testid="stException"]').count() == 0
        before = _metrics(page)
        assert before["Verified"] == f"0 / {n_cells}", before
        assert before["White cells"] == str(n_cells), before
        # per field and pooled (first): the white cells found add up to the sample's
        found = [int(v) for k, v in _metric_list(page) if k == "White cells found"]
        assert len(found) == 3 and found[0] == sum(found[1:]) == n_cells, found

        # five decisions with the keyboard only: nothing focused (not a text input), one key per cell
        seen = {}
        for k, key in enumerate(KEYS, start=1):
            cell, call = _pre_call(page)
            assert cell not in seen, f"{cell} came up twice"
            seen[cell] = (call, DECISION[key])
            # the five buttons are drawn (their shortcuts are live once they are), nothing is focused
            for shortcut in "YBNXU":
                page.locator(f'kbd[aria-label="Shortcut {shortcut}"]').wait_for(timeout=30_000)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.keyboard.press(key)
            _wait_metric(page, "Verified", f"{k} / {n_cells}")
            _settled(page)
        assert page.get_by_text("a verification needs the verifier's name").count() == 0
        after = _metrics(page)
        assert after["Verified"] == f"{len(KEYS)} / {n_cells}", after
        # one "not a white cell" leaves the count; the pre-classified blasts do not move
        assert after["White cells"] == str(n_cells - 1), after
        assert after["Blasts, pre-classified"] == before["Blasts, pre-classified"], (before, after)
        # the verified blasts: the "b" cell is now a blast, the "n" and "x" cells are not; confirmed cells keep
        # their pre-classification (a confirmed review-band call keeps its class, which the panel does not say)
        pre_blasts = int(before["Blasts, verified"])
        changed = {c: v for c, v in seen.items() if v[1] != "confirm"}
        delta = sum((d == "blast") - (call == "blast") for call, d in changed.values())
        if not any(call == "review" for call, _ in changed.values()):
            assert int(after["Blasts, verified"].split()[0]) == pre_blasts + delta, (seen, before, after)
        assert page.get_by_text(re.compile(r"Verified by Dr Test")).count() >= 1
        # the tiles say each decision
        for cell, (_, decision) in seen.items():
            assert page.get_by_role("button", name=re.compile(rf"→ {re.escape(decision)}")).count() >= 1, decision

        # the report, with a typed sample id
        sample = page.get_by_role("textbox", name=re.compile(r"^Sample id"))
        sample.fill("ACC-2024-0042")
        sample.press("Enter")
        _rerun_done(page)
        _, report = _download(page, "Download the report (HTML, printable)")
        html = report.decode("utf-8")
        assert "ACC-2024-0042" in html
        assert "Research use only" in html
        assert f"{len(KEYS)} of {n_cells} white cells verified by a person" in html
        assert "Dr Test" in html

        # the QuPath outlines: two fields read, so a zip with one .geojson per field
        filename, geo = _download(page, "Download outlines for QuPath (GeoJSON, zip)")
        assert filename == "qupath_geojson.zip"
        with zipfile.ZipFile(io.BytesIO(geo)) as z:
            members = sorted(z.namelist())
            assert members == sorted(f"{Path(n).stem}.geojson" for n in names), members
            features = [f for name in members for f in _check_collection(_strict_json(z.read(name)), name)]
        assert len(features) == n_cells  # one detection per white cell found
        by_name = {f["properties"]["name"]: f["properties"] for f in features}
        assert len(by_name) == n_cells
        classes = [f["properties"]["classification"]["name"] for f in features]
        assert classes.count("not a white cell") == 1, classes
        assert sorted(p["decision"] for p in by_name.values() if "decision" in p) == sorted(DECISION[k] for k in KEYS)
        for cell, (call, decision) in seen.items():
            cls = by_name[cell]["classification"]["name"]
            assert by_name[cell]["decision"] == decision, (cell, by_name[cell])
            if decision in ("blast", "normal", "not a white cell"):
                assert cls == decision, (cell, cls)
            elif call in ("blast", "normal"):  # confirmed: keeps its pre-classified class
                assert cls == call, (cell, call, cls)
            elif call == "not assessed":
                assert cls == "not judged", (cell, cls)

        # the crops the model judged: one PNG per white cell
        _, crops = _download(page, "Download the cell crops (zip)")
        with zipfile.ZipFile(io.BytesIO(crops)) as z:
            pngs = [n for n in z.namelist() if n.endswith(".png")]
            assert len(pngs) == n_cells and all(z.read(n)[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs), z.namelist()

        head.scroll_into_view_if_needed()  # the app scrolls in its own container: show the verification
        page.wait_for_timeout(1500)  # let the data grids paint before the screenshot
        page.screenshot(path=str(ARTIFACTS / "browser_verify.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "browser_verify.png").stat().st_size > 10_000
