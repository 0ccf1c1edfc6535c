"""Screenshots of the running dashboard for the README and docs/: `make screenshots` (a few minutes on 2 cores).

What it does, start to end, in a temporary folder (nothing of yours is touched; only docs/images/ is written):
1. generates a small synthetic C-NMC dataset (`core.data.synthetic`) and trains the demo recipe on it (Solution A at
   64 px, the project's default recipe) into a temporary run store, so Train has live curves and Misclassified
   has errors;
2. starts the app on a free loopback port with that run store (as tests/test_browser.py does);
3. drives Debian's Chromium with Playwright (headless): Classify with a few generated cells (Grad-CAM on),
   Classify with a generated smear field (`core.smear.synthetic_fields`; the shipped smear model's gate refuses its
   drawn cells, so the shot shows the `cannot judge` read-out with its reason), Train with the run's curves,
   Misclassified;
4. writes docs/images/*.png (1280 px wide, palette-quantised to stay small).

Every image shown is generated: no real patient's cell is ever in a committed screenshot. Not part of
`make test` (it trains a model); run it after a change to the pages the README shows.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "images"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
WIDTH = 1280
MAX_BYTES = 300_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(work: Path, epochs: int) -> tuple[Path, Path, list[Path], Path]:
    """(data, run store, cells to upload, field to upload): generated cells, a finished demo run, a field."""
    import numpy as np
    from PIL import Image

    from core.data.labels import CLASSES
    from core.data.synthetic import synthesize
    from core.smear.synthetic_fields import synth_field
    from training.cli import demo_config
    from training.store import RunStore
    from training.trainer import train

    data, runs, uploads = work / "demo_data", work / "runs", work / "uploads"
    uploads.mkdir(parents=True)
    log("generating synthetic cells")
    synthesize(data, cells_per_subject=12, seed=0, workers=2, progress=False)  # default label noise: real errors
    log(f"training the demo recipe ({epochs} epochs)")
    store = RunStore(runs)
    run_id = train(demo_config(data, runs, epochs=epochs), store)
    run = store.get_run(run_id)
    if run["status"] != "completed":
        raise SystemExit(f"the demo run did not complete: {run['error']}")
    cells = []
    for label in CLASSES[::-1]:  # three cells of each class (blasts first), from different subjects
        seen = set()
        for path in sorted(data.rglob(f"training_data/*/{label}/UID_*.bmp")):
            subject = path.name.split("_")[1]
            if subject not in seen:
                seen.add(subject)
                cells.append(shutil.copy(path, uploads / path.name))
            if len(seen) == 3:
                break
    image, _ = synth_field(height=600, width=800, wbc=5, touching_pairs=1, border_cells=1, seed=1)
    field = uploads / "generated_field.png"
    Image.fromarray(np.asarray(image)).save(field)
    return data, runs, [Path(c) for c in cells], field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(work: Path, data: Path, runs: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    roots = work / "data_roots"
    roots.mkdir()
    env = dict(os.environ, CNMC_RUNS_DIR=str(runs), CNMC_DEMO_DATA=str(data), CNMC_DATA_ROOTS=str(roots),
               CNMC_LOCK_DIR=str(work / "locks"), PYTHONPATH=str(REPO))
    logfile = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"],
                            cwd=REPO, env=env, stdout=logfile, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 90
    while time.time() < end:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not start:\n" + (work / "server.log").read_text())


def shrink(path: Path) -> int:
    """Palette-quantise the PNG (UI colours survive; photos dither a little) and return its size in bytes."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    for colours in (256, 128, 64):
        rgb.quantize(colors=colours, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            break
    return path.stat().st_size


def shot(page, out: Path, anchor=None, height: int = 800) -> None:
    """A `WIDTH`×`height` screenshot with `anchor` (a locator) at the top of the view (below the app's header)."""
    page.set_viewport_size({"width": WIDTH, "height": height})
    if anchor is not None:
        anchor.first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(1500)  # let grids and images paint
    page.screenshot(path=str(out))
    log(f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out}: {shrink(out) // 1000} KB")


def open_page(browser, url: str, title: str):
    page = browser.new_page(viewport={"width": WIDTH, "height": 800})
    page.goto(url)
    page.get_by_text(title, exact=True).first.wait_for(timeout=90_000)
    return page


def pick_run(page) -> None:
    """On Classify: judge with the demo run (trained on the same kind of generated cells)."""
    page.get_by_text("Completed run", exact=True).click()
    page.get_by_text("Run", exact=True).first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)


def capture(url: str, cells: list[Path], field: Path, out: Path) -> None:
    import re

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)

        log("Classify: cells")
        page = open_page(browser, url, "Classify cells")
        pick_run(page)
        page.get_by_text("Show Grad-CAM overlays", exact=False).first.click()  # the cards show the evidence
        page.wait_for_timeout(1000)
        page.locator("input[type=file]").first.set_input_files([str(c) for c in cells])
        done = page.get_by_text(re.compile(r"^\d+ cells? classified"))
        done.wait_for(timeout=180_000)
        page.get_by_text(f"{cells[0].name}: ").first.wait_for(timeout=60_000)  # the cards
        shot(page, out / "classify-cells.png", done, height=1150)
        page.close()

        log("Classify: a smear field")
        page = open_page(browser, url, "Classify cells")
        pick_run(page)
        page.get_by_text("Uploads are smear fields", exact=False).first.click()
        page.wait_for_timeout(1000)
        page.locator("input[type=file]").first.set_input_files(str(field))
        fields = page.get_by_text(re.compile(r"^Smear fields \(\d+\)$"))
        fields.wait_for(timeout=180_000)
        page.get_by_text("outlines coloured by call").first.wait_for(timeout=60_000)
        shot(page, out / "smear-field.png", page.locator("strong", has_text=field.name), height=1000)
        page.close()

        log("Train: the run's curves")
        page = open_page(browser, f"{url}/train", "Train")
        page.get_by_text("New run", exact=True).first.click()  # fold the form away: the runs are the point
        page.locator(".js-plotly-plot").first.wait_for(timeout=90_000)
        shot(page, out / "train.png", page.get_by_text("Runs", exact=True), height=800)
        page.close()

        log("Misclassified")
        page = open_page(browser, f"{url}/misclassified", "Misclassified cells")
        page.get_by_text(re.compile(r"false positives, \d+ false negatives")).first.wait_for(timeout=90_000)
        page.locator("[data-testid=stImage] img").first.wait_for(timeout=90_000)
        shot(page, out / "misclassified.png", page.get_by_text("Misclassified cells", exact=True), height=900)
        page.close()
        browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT), help="folder for the PNGs (default docs/images)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the demo run (default 6)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (data, run, server log)")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: `make browser-deps` installs Debian's chromium", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="cnmc-screenshots-"))
    os.environ["CNMC_LOCK_DIR"] = str(work / "locks")  # our training queues on its own lock
    proc = None
    try:
        data, runs, cells, field = prepare(work, args.epochs)
        proc, url = serve(work, data, runs)
        log(f"app at {url}")
        capture(url, cells, field, out)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
