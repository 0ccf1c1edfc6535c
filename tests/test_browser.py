"""One real-browser end-to-end test: Debian's Chromium driven by Playwright against the running app."""
import re
from pathlib import Path

import pytest
from helpers import ARTIFACTS, CHROMIUM, FLAGS, serve_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture()
def server(demo_run, tmp_path):
    store, _, data = demo_run
    with serve_app(store.root, data, tmp_path) as url:
        yield url


@pytest.fixture()
def own_server(demo_run, tmp_path):
    """The app on a copy of the demo run store: a test that launches runs leaves the shared one as it was."""
    import shutil

    store, _, data = demo_run
    runs = shutil.copytree(store.root, tmp_path / "runs")
    with serve_app(runs, data, tmp_path) as url:
        yield url


def test_upload_a_cell_and_see_the_prediction(server, cell_dir):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make test` installs it (make browser-deps)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    cell = cell_dir / "UID_h3_4_1_hem.bmp"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        page.get_by_text("Classify cells").wait_for(timeout=60_000)
        assert page.get_by_text("not a diagnostic device").is_visible()
        page.locator("input[type=file]").first.set_input_files(str(cell))
        # the default model: the shipped starter (real cells) when present, else the demo run; either way the
        # cell gets a class, or "Not assessed" with the reason when the model's gate refuses it
        page.get_by_text(re.compile(r"^[01] cells? classified")).wait_for(timeout=120_000)
        card = page.get_by_text("UID_h3_4_1_hem.bmp: ")  # the cell's card: image + predicted class
        card.first.wait_for(timeout=30_000)
        caption = card.first.inner_text()
        assert re.search(r"(hem|all) \(P\(blast\) [01]\.\d\d\)|Not assessed \(.{10,}\)", caption), caption
        page.wait_for_timeout(1500)  # let the data grid paint before the screenshot
        page.screenshot(path=str(ARTIFACTS / "browser_classify.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "browser_classify.png").stat().st_size > 10_000


def test_train_pick_a_preset_see_the_estimate_launch_and_watch(own_server):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make test` installs it (make browser-deps)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{own_server}/train")
        page.get_by_text("New run").wait_for(timeout=60_000)
        # the preset proposed without a GPU, its one line, and the estimate measured on the demo run (same shape)
        page.get_by_text(re.compile(r"^quick_demo: .*about a minute")).wait_for(timeout=60_000)
        estimate = page.get_by_text(re.compile(r"^About .* on this machine"))
        estimate.wait_for(timeout=120_000)
        assert "measured: run" in estimate.inner_text() or "timed now" in estimate.inner_text()
        page.get_by_role("button", name="Launch training").click()
        page.get_by_text("launched in the background").wait_for(timeout=60_000)
        # watch it train: the progress line moves through epochs and the live curves appear
        page.get_by_text(re.compile(r"^(running|queued): epoch \d/3")).first.wait_for(timeout=120_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=240_000)
        page.get_by_text(re.compile(r"^completed: 3 of 3 epochs trained")).first.wait_for(timeout=300_000)
        page.screenshot(path=str(ARTIFACTS / "browser_train.png"), full_page=True)
        browser.close()


def test_run_report_opens_offline_with_every_section(demo_run, tmp_path):
    """`python -m training report RUN`: one HTML file that Chromium renders with the network cut off."""
    from playwright.sync_api import sync_playwright

    from training.cli import main
    from training.report import SECTIONS

    store, rid, _ = demo_run
    out = tmp_path / "report.html"
    assert main(["report", rid, "--runs-dir", str(store.root), "--out", str(out)]) == 0
    text = out.read_text()
    assert 'src="http' not in text and "src='http" not in text  # nothing fetched from the network
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(offline=True)
        page = context.new_page()
        fetched = []
        page.on("request", lambda r: fetched.append(r.url))
        page.goto(out.as_uri())
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
        assert [h.inner_text() for h in page.locator("h2").all()] == list(SECTIONS)
        assert page.locator(".js-plotly-plot").count() >= 5  # curves, confusion, ROC, PR, reliability
        assert page.get_by_text("Research use only").is_visible()
        browser.close()
    assert all(u.startswith(("file:", "data:")) for u in fetched), fetched
    assert main(["report", "no-such-run", "--runs-dir", str(store.root)]) == 2
