"""A lab server that fails closed (issue 29, items 3 to 5): uploads told apart by position and checked before
decoding, one classification per session and no second one on a rerun; run actions recorded with their actor, a
cancel that signals only a process proven to be the worker; page writes that say "busy" or "under maintenance"
within seconds. Services and AppTest with a tiny model: no trained run needed."""
from __future__ import annotations

import hashlib
import io
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from dashboard import auth, services, uploads
from training import jobs
from training.store import RunStore, StoreBusy, StoreMaintenance, _proc_start, maintenance_lock

REPO = Path(__file__).resolve().parent.parent
TRAINER = auth.Actor("tess.trainer@lab.example", "trainer")


def _png16(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG of zeros: ~120 KB for 8000x8000, 128 MB once decoded (and more as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + 2 * width)
    body = [z.compress(row * 500) for _ in range(height // 500)] + [z.compress(row * (height % 500)), z.flush()]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))


def _cell(seed: int) -> bytes:
    from core.data.imageio import encode_bmp

    rng = np.random.default_rng(seed)
    img = np.zeros((120, 120, 3), np.uint8)
    yy, xx = np.mgrid[:120, :120]
    img[(yy - 60) ** 2 + (xx - 60) ** 2 < 40 ** 2] = rng.integers(80, 200, 3, dtype=np.uint8)
    return encode_bmp(img)


@pytest.fixture(scope="module")
def tiny_bundle():
    """A tiny untrained model with a rule that calls every cell a blast (no gate): deterministic calls."""
    from core.nets.augmentation import AugmentSpec
    from core.decide.calibration import DecisionRule
    from core.nets.models import create_model

    model = create_model("solution_a", 32, augment=AugmentSpec(), standardize=True, filters=(4, 4, 4, 4))
    return services.ModelBundle([model], DecisionRule(threshold=0.0, band=0.0, fitted_on="unit test"), 32,
                                "tiny cell model", model_sha256="0" * 64)


# --- 3. uploads ---------------------------------------------------------------------------------------------------
def test_two_different_cells_under_one_name_are_two_rows_two_crops_two_audit_records(tiny_bundle, tmp_path):
    runs = tmp_path / "runs"
    a, b = _cell(1), _cell(2)
    result = services.classify_uploads(tiny_bundle, [("cell.bmp", a), ("cell.bmp", b)], runs_dir=runs,
                                       actor=TRAINER, upload_keys=["id-a", "id-b"])
    assert result.table["file"].tolist() == ["cell.bmp", "cell.bmp (2)"]
    assert result.table["prediction"].tolist() == ["all", "all"] and result.table["error"].isna().all()
    assert set(result.crops) == {"cell.bmp", "cell.bmp (2)"}
    assert not np.array_equal(result.crops["cell.bmp"], result.crops["cell.bmp (2)"])
    trail = RunStore(runs).classifications()
    assert len(trail) == 2 and set(trail["file_name"]) == {"cell.bmp"}  # the user's name, twice
    assert set(trail["file_sha256"]) == {hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()}
    assert trail["prediction"].tolist() == ["all", "all"]
    # the same uploads again (a rerun that missed the page's cache): recorded once, by file id
    services.classify_uploads(tiny_bundle, [("cell.bmp", a), ("cell.bmp", b)], runs_dir=runs, actor=TRAINER,
                              upload_keys=["id-a", "id-b"])
    assert len(RunStore(runs).classifications()) == 2


def test_labels_are_unique_even_against_a_name_that_looks_like_a_suffix():
    ups = uploads.labelled([("c.bmp", b"1"), ("c.bmp (2)", b"2"), ("c.bmp", b"3")], ["x", "y", "z"])
    assert [u.label for u in ups] == ["c.bmp", "c.bmp (2)", "c.bmp (3)"]
    assert [u.name for u in ups] == ["c.bmp", "c.bmp (2)", "c.bmp"] and ups[2].key == "z"


def test_a_16_bit_png_bomb_is_refused_from_its_header_in_well_under_a_second(tiny_bundle, tmp_path, monkeypatch):
    from PIL import ImageFile

    bomb = _png16(8000, 8000)  # 64 megapixels: within the field limit in pixels, twice it in memory
    assert len(bomb) < 200_000

    def no_decoding(*_a, **_k):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for as_fields, limit in ((False, "64 megapixels for a smear field"), (True, "64 megapixels for a smear field")):
        start = time.perf_counter()
        result = services.classify_uploads(tiny_bundle, [("bomb.png", bomb)], runs_dir=tmp_path / "runs",
                                           actor=TRAINER, as_fields=as_fields)
        seconds = time.perf_counter() - start
        why = result.table["error"].iloc[0] if len(result.table) else result.field_readout.iloc[0]["why"]
        assert seconds < 5, seconds  # a header read, not a 128 MB decode
        assert "8000x8000 pixels at 16 bits" in why and limit in why and "refused before decoding" in why, why


def test_a_photo_past_a_single_cells_pixels_goes_to_the_field_path_undecoded_as_a_cell(tiny_bundle, tmp_path,
                                                                                        monkeypatch):
    """No cell is 5 megapixels: an ALL-IDB1-sized photo uploaded without the fields toggle is not refused and
    never judged as one cell; it is segmented as a field (a single cell's 4 MP limit routes, the field's refuses)."""
    from PIL import Image

    from core.smear.synthetic_fields import synth_field

    img, _ = synth_field(1944, 2592, wbc=3, rbc=200, platelets=0, touching_pairs=0, border_cells=0, rbc_px=60.0)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    ups = uploads.labelled([("field.png", buf.getvalue())])
    assert services.screen_uploads(ups) == ({}, {"field.png"})
    judged_as_cells = []
    import core.decide.inference as inference

    real_classify = inference.classify
    monkeypatch.setattr(inference, "classify", lambda models, items, *a, **k: judged_as_cells.extend(
        n for n, _ in items) or real_classify(models, items, *a, **k))
    result = services.classify_uploads(tiny_bundle, [("field.png", buf.getvalue())], runs_dir=tmp_path / "runs",
                                       actor=TRAINER)
    assert "field.png" not in judged_as_cells
    assert [fc.name for fc in result.fields] == ["field.png"] and len(result.fields[0].table) >= 1
    assert "field.png" not in set(result.table["file"])


def test_a_file_that_would_pass_the_uploads_total_bytes_is_refused_by_position(monkeypatch):
    monkeypatch.setenv("CNMC_MAX_UPLOAD_TOTAL_MB", "1")
    files = [("a.bmp", _cell(1)), ("a.bmp", bytes(700_000)), ("a.bmp", bytes(700_000)), ("b.bmp", _cell(3))]
    refused = services.upload_refusals(uploads.labelled(files))
    assert set(refused) == {"a.bmp (3)"} and "past its 1 MB total" in refused["a.bmp (3)"]
    assert "1 MB per upload" in services.upload_limits()


def test_one_classification_per_session_at_a_time():
    state: dict = {}
    with uploads.one_job(state, now=100.0):
        with pytest.raises(uploads.JobRunning, match="already classifying"):
            with uploads.one_job(state, now=101.0):
                pass
    assert uploads.JOB_FLAG not in state  # cleared however it ended
    state[uploads.JOB_FLAG] = 0.0  # left by a run that died long ago: taken over
    with uploads.one_job(state, now=uploads.STALE_JOB_S + 1):
        pass


def test_classify_page_classifies_once_per_upload_and_keeps_both_cells_of_one_name(tiny_bundle, tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CNMC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(services, "starter_available", lambda: True)
    monkeypatch.setattr(services, "load_starter_bundle", lambda: (tiny_bundle, "# card"))
    calls = []
    real = services.classify_uploads
    monkeypatch.setattr(services, "classify_uploads", lambda *a, **k: calls.append(1) or real(*a, **k))
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(REPO / "pages" / "classify.py"), default_timeout=120)
        at.run()
        at.file_uploader(key="cells").set_value([("cell.bmp", _cell(1), "image/bmp"),
                                                 ("cell.bmp", _cell(2), "image/bmp")]).run()
        assert not at.exception, at.exception
        assert at.dataframe[0].value["file"].tolist() == ["cell.bmp", "cell.bmp (2)"]
        at.run()  # a rerun (any click): the same result, not classified again
        assert not at.exception and len(calls) == 1
        assert at.dataframe[0].value["file"].tolist() == ["cell.bmp", "cell.bmp (2)"]
        assert len(RunStore(tmp_path / "runs").classifications()) == 2
    finally:
        st.cache_resource.clear()


# --- 4. run actions -------------------------------------------------------------------------------------------------
@pytest.fixture()
def lab(tmp_path, monkeypatch):
    """Offered paths (a demo folder, a weights root with one file) and no real worker: `_spawn` is a stand-in."""
    demo, weights = tmp_path / "demo", tmp_path / "weights"
    demo.mkdir()
    (weights / "lab").mkdir(parents=True)
    (weights / "lab" / "start.weights.h5").write_bytes(b"h5")
    for name, value in {"CNMC_RUNS_DIR": tmp_path / "runs", "CNMC_DEMO_DATA": demo,
                        "CNMC_DATA_ROOTS": tmp_path / "roots", "CNMC_WEIGHTS_ROOTS": weights}.items():
        monkeypatch.setenv(name, str(value))
    spawned = []
    monkeypatch.setattr(jobs, "_spawn", lambda store, run_id, args: spawned.append((run_id, args)) or 1)
    return tmp_path / "runs", demo, weights / "lab" / "start.weights.h5", spawned


def test_every_run_action_records_its_actor(lab):
    from training.config import RunConfig

    runs, demo, _, spawned = lab
    cfg = RunConfig(architecture="solution_a", init="none", data_dir=str(demo), runs_dir=str(runs), epochs=2)
    rid = services.launch_run(cfg, actor=TRAINER)
    store = RunStore(runs)
    store.finish(rid, "cancelled")
    services.resume_run(runs, rid, actor=TRAINER)
    store.finish(rid, "completed")
    services.resume_run(runs, rid, epochs=5, actor=auth.LOCAL)
    acts = store.actions(rid)
    assert acts["action"].tolist() == ["launch", "resume", "extend"]
    assert acts["actor"].tolist() == [TRAINER.identity, TRAINER.identity, auth.LOCAL_USER]
    assert acts["detail"].iloc[2] == "epochs 2 -> 5" and (acts["host"] == socket.gethostname()).all()
    assert len(spawned) == 3


def test_a_page_launch_reads_only_offered_paths(lab):
    from training.config import RunConfig

    runs, demo, weights, _ = lab
    base = dict(architecture="solution_a", runs_dir=str(runs), epochs=1)
    with pytest.raises(auth.PermissionDenied, match="not a dataset this server offers"):
        services.launch_run(RunConfig(init="none", data_dir="/etc", **base), actor=TRAINER)
    with pytest.raises(auth.PermissionDenied, match="not a weights file this server offers"):
        services.launch_run(RunConfig(init="/etc/passwd", data_dir=str(demo), **base), actor=TRAINER)
    assert RunStore(runs).list_runs().empty  # refused before anything was registered
    assert services.launch_run(RunConfig(init=str(weights), data_dir=str(demo), **base), actor=TRAINER)


@pytest.fixture()
def dummy():
    """A live local process standing in for a worker's pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _run_with_worker(store: RunStore, pid: int, host: str, start: str | None) -> str:
    rid = store.create_run({"name": "x", "architecture": "solution_a", "epochs": 1})
    store.claim(rid, pid)
    with store._connect() as con:
        con.execute("UPDATE runs SET host=?, pid_start=?, heartbeat_at=? WHERE id=?", (host, start, time.time(), rid))
    return rid


def test_cancel_of_a_run_on_another_host_signals_no_local_process(tmp_path, dummy):
    store = RunStore(tmp_path / "runs")
    rid = _run_with_worker(store, dummy.pid, "another-host.lab.example", _proc_start(dummy.pid))
    assert services.cancel_run(store.root, rid, actor=TRAINER)
    time.sleep(0.5)
    assert dummy.poll() is None  # still alive: a pid of another host names nothing here
    assert store.heartbeat(rid)  # the flag its worker polls
    assert store.actions(rid)[["action", "actor"]].values.tolist() == [["cancel", TRAINER.identity]]


def test_cancel_signals_only_the_process_started_at_the_recorded_time(tmp_path, dummy):
    store = RunStore(tmp_path / "runs")
    recycled = _run_with_worker(store, dummy.pid, socket.gethostname(), "1")  # same pid, another start: not it
    assert not jobs.is_local_worker(store.get_run(recycled))
    assert not jobs.cancel(recycled, store, actor="t")  # its worker is gone: the run is failed, nothing signalled
    time.sleep(0.5)
    assert dummy.poll() is None and store.get_run(recycled)["status"] == "failed"
    worker = _run_with_worker(store, dummy.pid, socket.gethostname(), _proc_start(dummy.pid))
    assert jobs.cancel(worker, store, actor="t")
    assert dummy.wait(timeout=10) == -15  # SIGTERM: the recorded worker itself


def test_the_workers_heartbeat_turns_the_cancel_flag_into_a_stop(tmp_path):
    from training.worker import Heartbeat, StopFlag

    store = RunStore(tmp_path / "runs")
    rid = store.create_run({"name": "x", "architecture": "solution_a", "epochs": 1})
    store.claim(rid, 424242)
    stop = StopFlag()
    with Heartbeat(store, rid, every=0.05, stop=stop):
        assert not stop
        store.request_cancel(rid)
        assert stop.event.wait(5) and "cancel requested" in stop.signal_name
    store.claim(rid, 434343)  # a new worker (a resume) starts without the old request
    assert not store.heartbeat(rid)


def test_an_old_store_gains_run_actions_and_the_cancel_flag_once(tmp_path):
    root = tmp_path / "runs"
    RunStore(root)
    with sqlite3.connect(root / "runs.sqlite") as con:
        con.execute("DROP TABLE run_actions")
        con.execute("ALTER TABLE runs DROP COLUMN cancel_requested")
    store = RunStore(root)
    rid = store.create_run({"name": "x"})
    store.record_action(rid, "launch", "ana")
    store.request_cancel(rid)
    assert store.actions()["actor"].tolist() == ["ana"] and store.heartbeat(rid)


# --- 5. page writes: busy, maintenance ------------------------------------------------------------------------------
def test_a_page_write_behind_a_long_writer_says_busy_within_seconds(tmp_path):
    root = tmp_path / "runs"
    RunStore(root)
    holder = sqlite3.connect(root / "runs.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock for minutes
    try:
        start = time.perf_counter()
        with pytest.raises(StoreBusy, match="busy.*try again"):
            services.record_review(root, "UID_1_1_1_all.bmp", "all", "unsure", actor=auth.LOCAL.named("ana"))
        assert time.perf_counter() - start < 15
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    services.record_review(root, "UID_1_1_1_all.bmp", "all", "unsure", actor=auth.LOCAL.named("ana"))


def test_restore_holds_a_maintenance_lock_that_page_writes_respect(tmp_path):
    from training.store import restore

    root = tmp_path / "runs"
    store = RunStore(root)
    backup = store.backup(tmp_path / "b.sqlite")
    with maintenance_lock(root):
        with pytest.raises(StoreMaintenance, match="under maintenance"):
            services.record_review(root, "UID_1_1_1_all.bmp", "all", "unsure", actor=auth.LOCAL.named("ana"))
        with pytest.raises(RuntimeError, match="under maintenance"):
            restore(backup, root, force=True)  # a second restore waits for the first
        store.heartbeat("none")  # a worker's write is not a page's: it goes on
    services.record_review(root, "UID_1_1_1_all.bmp", "all", "unsure", actor=auth.LOCAL.named("ana"))
    assert restore(backup, root, force=True) is not None
    assert not (root / "runs.sqlite.maintenance").exists()
