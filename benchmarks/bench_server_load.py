"""Benchmark: several people using the dashboard at once while a training runs; nothing lost, nothing doubled.

    .venv/bin/python benchmarks/bench_server_load.py [--sessions 8] [--actions 50] [--max-seconds 1200]

What it does, on this machine only (no network; a throwaway run store under /tmp):
1. generates the synthetic demo cells and trains the demo recipe (Solution A, 64 px, 3 epochs: about a minute on
   2 CPU cores), so Classify has a completed run to use;
2. launches a second, longer demo run in the background (`training.jobs.launch`: a real worker process writing
   epochs, progress and heartbeats into the same store) on a private device lock;
3. opens N sessions of the real app (`streamlit_app.py`, its navigation and pages) with Streamlit's AppTest, one
   thread each: in each, the reviewer name in the sidebar, then per action one generated cell uploaded on Classify
   (timed until the page has classified it and shows its card), then on that cell's card "Review label" with a
   note and "Save review" (timed until the page has rerun);
4. cancels the background run, then checks the store: every review exactly once (by its note), every upload's
   classification recorded exactly once (the page classifies its uploads again on every rerun, e.g. after the
   review click; the audit record's uid, from the upload's file id, keeps that one record), the worker's epochs
   there, `PRAGMA integrity_check` ok;
5. prints the median and 95th-percentile response time per classify action and per review.

Why AppTest and not a browser: Streamlit runs every browser session as a thread of one server process that
executes the page scripts; AppTest runs the same scripts, the same services, the same `st.cache_resource`
(one model for all sessions) and the same run store in threads of one process, so the measured path is the
app's: script reruns, model inference, audit and review writes under the GIL beside a training process. What it
leaves out is the websocket transport and the browser's drawing (see bench_dashboard.py for those, one session
in Chromium); 8 Chromium contexts on 2 cores would mostly measure Chromium.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
APP = str(REPO / "streamlit_app.py")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def figures(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: no measurements"
    return (f"{name}: n={len(values)}, median {statistics.median(values):.2f} s, "
            f"95th percentile {pct(values, 0.95):.2f} s, max {max(values):.2f} s")


def session(i: int, cells: list[bytes], actions: int, deadline: float, start: threading.Barrier, out: dict) -> None:
    from streamlit.testing.v1 import AppTest

    res = out[i] = {"classify": [], "review": [], "reruns": {}, "notes": [], "errors": []}
    try:
        at = AppTest.from_file(APP, default_timeout=600)
        at.run()
        assert not at.exception, at.exception
        model = at.radio[0]
        if "Completed run" in model.options and model.value != "Completed run":
            model.set_value("Completed run").run()
        at.text_input(key="reviewer").set_value(f"user{i}").run()
        assert not at.exception, at.exception
        start.wait()
        for k in range(actions):
            if time.time() > deadline:
                res["errors"].append(f"stopped at action {k}: past --max-seconds")
                break
            for attempt in range(5):  # a cell the gate refuses ("not assessed") has no card to review: the next
                name = f"UID_{100 + i}_{k + 1}_{attempt + 1}_all.bmp"  # named C-NMC-style: its card offers review
                cell = cells[(i * actions + k + attempt * 7919) % len(cells)]
                t0 = time.perf_counter()
                at.file_uploader(key="cells").set_value([(name, cell, "image/bmp")])
                at.run()
                res["classify"].append(time.perf_counter() - t0)
                assert not at.exception, at.exception
                res["reruns"][name] = 1
                heads = [h.value for h in at.subheader]
                if any(h.startswith("1 cell classified") for h in heads):
                    break
                assert any("not assessed" in h for h in heads), heads
                res["refused"] = res.get("refused", 0) + 1
            note = f"load s{i} a{k}"
            t0 = time.perf_counter()
            at.text_input(key="note-classify-0").set_value(note)
            at.button(key="save-classify-0").click()
            at.run()
            res["review"].append(time.perf_counter() - t0)
            assert not at.exception, at.exception
            # the rerun after the click classifies the upload again: still one audit record for the upload
            res["notes"].append(note)
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        res["errors"].append(f"{type(exc).__name__}: {exc}")
        start.abort()  # the others do not wait for a session that will not come


def one_runtime() -> None:
    """Make AppTest's sessions threads of one app, as the server's are. AppTest is written for one session at a
    time: each run installs its own mock `Runtime` and removes it when done, makes its own compiled-script cache
    (8 threads compiling the pages at once is more than CPython 3.11's compiler survives: "AST constructor
    recursion depth mismatch") and sets a config option for the run's duration. Here all sessions share one mock
    runtime (one media file manager, one cache storage, like the server's `Runtime`), one script cache with its
    lock (the server's), and the option is set once."""
    from unittest.mock import MagicMock

    from streamlit import config
    from streamlit.runtime import Runtime
    from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
    from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner

    shared = MagicMock(spec=Runtime)
    shared.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    shared.dataframe_source_mgr = DataframeSourceManager()
    shared.cache_storage_manager = MemoryCacheStorageManager()
    Runtime.instance = classmethod(lambda cls: shared)
    Runtime.exists = classmethod(lambda cls: True)
    cache = ScriptCache()
    app_test.ScriptCache = local_script_runner.ScriptCache = lambda: cache
    config.set_option("global.appTest", True)

    class _Kept:  # the option stays set for every run
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    app_test.patch_config_options = _Kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--actions", type=int, default=50, help="cells classified (and reviews) per session")
    ap.add_argument("--max-seconds", type=float, default=1200, help="stop the sessions after this long")
    ap.add_argument("--work", default=None, help="folder to work in (default: a new one under /tmp)")
    args = ap.parse_args()
    if not 1 <= args.sessions <= 32 or not 1 <= args.actions <= 500:
        ap.error("sessions 1-32, actions 1-500")

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_load_"))
    data, runs = work / "data", work / "runs"
    os.environ.update(CNMC_RUNS_DIR=str(runs), CNMC_DEMO_DATA=str(data), CNMC_DATA_ROOTS=str(work / "no-roots"),
                      CNMC_LOCK_DIR=str(work / "locks"))

    from core.data.synthetic import synthesize
    from training import jobs
    from training.cli import demo_config
    from training.store import RunStore
    from training.trainer import train

    store = RunStore(runs)
    t0 = time.time()
    if not any(data.rglob("UID_*.bmp")):
        synthesize(data, cells_per_subject=12, noise=0.0, seed=0, workers=2, progress=False)
    done = store.list_runs(status="completed")
    demo = done["id"].iloc[0] if len(done) else train(demo_config(data, runs, epochs=3), store)
    print(f"demo run {demo}: {store.get_run(demo)['status']} ({time.time() - t0:.0f} s incl. data)", flush=True)
    cells = [p.read_bytes() for p in sorted(data.rglob("UID_*.bmp"))[:200]]

    background = jobs.launch(demo_config(data, runs, epochs=200), store)
    deadline = time.time() + 180
    while store.get_run(background)["status"] != "running" and time.time() < deadline:
        time.sleep(0.5)
    print(f"background run {background}: {store.get_run(background)['status']}", flush=True)

    one_runtime()
    since = time.time()  # records of earlier invocations in a reused --work store are not counted
    out: dict = {}
    barrier = threading.Barrier(args.sessions + 1)
    threads = [threading.Thread(target=session, args=(i, cells, args.actions, time.time() + args.max_seconds,
                                                     barrier, out)) for i in range(args.sessions)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=600)
    except threading.BrokenBarrierError:
        pass
    t0 = time.time()
    for t in threads:
        t.join()
    seconds = time.time() - t0
    bg = store.get_run(background)
    bg_epochs = len(store.epochs(background))
    jobs.cancel(background, store)
    end = time.time() + 120
    while store.get_run(background)["status"] in ("queued", "running") and time.time() < end:
        time.sleep(0.5)

    errors = [f"session {i}: {e}" for i, r in out.items() for e in r["errors"]]
    classify = [x for r in out.values() for x in r["classify"]]
    review = [x for r in out.values() for x in r["review"]]
    expected_reruns = {n: c for r in out.values() for n, c in r["reruns"].items()}
    notes = [n for r in out.values() for n in r["notes"]]
    refused = sum(r.get("refused", 0) for r in out.values())

    with sqlite3.connect(runs / "runs.sqlite") as con:
        check = con.execute("PRAGMA integrity_check").fetchone()[0]
        trail = dict(con.execute("SELECT file_name, COUNT(*) FROM classifications WHERE at>=? GROUP BY file_name",
                                 (since,)).fetchall())
        stored_notes = [r[0] for r in con.execute("SELECT note FROM label_reviews WHERE at>=?", (since,))]
        reviewers = {r[0] for r in con.execute("SELECT DISTINCT reviewer FROM label_reviews WHERE at>=?", (since,))}
    lost_reviews = set(notes) - set(stored_notes)
    doubled_reviews = len(stored_notes) - len(set(stored_notes))
    wrong_counts = {n: (trail.get(n, 0), c) for n, c in expected_reruns.items() if trail.get(n, 0) != c}

    print(f"\n{args.sessions} sessions x {args.actions} actions (classify 1 cell, then review it) in {seconds:.0f} s, "
          f"beside background run {background} ({bg['status']}, {bg_epochs} epochs written meanwhile); "
          f"{os.cpu_count()} CPU cores", flush=True)
    print(figures("classify (upload 1 cell -> page classified it)", classify))
    print(figures("review (Save review -> page rerun done)", review))
    print(f"classifications: {sum(trail.get(n, 0) for n in expected_reruns)} audit records for "
          f"{len(expected_reruns)} uploads; records per upload {sorted(set(trail.get(n, 0) for n in expected_reruns))} "
          f"(one each, reruns included; {refused} uploads not assessed by the gate, replaced by the next cell); "
          f"{len(wrong_counts)} files with a wrong count")
    print(f"reviews: {len(stored_notes)} stored for {len(notes)} saved, {len(lost_reviews)} lost, "
          f"{doubled_reviews} doubled; reviewers {sorted(reviewers)}")
    print(f"integrity_check: {check}")
    for e in errors[:10]:
        print("error:", e)
    ok = (check == "ok" and not lost_reviews and not doubled_reviews and not wrong_counts and not errors
          and len(notes) == args.sessions * args.actions)
    print("RESULT:", "ok: every classification and review in the store exactly once" if ok else "FAILED")
    if wrong_counts:
        print("wrong counts (stored, expected):", list(wrong_counts.items())[:10])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
