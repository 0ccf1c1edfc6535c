"""Multi-worker training that has run: two workers on 127.0.0.1 train one run together, on TensorFlow
(MultiWorkerMirroredStrategy) and on JAX (jax.distributed + keras.distribution.DataParallel), from one TF_CONFIG."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_two_workers_train_one_run(synth_small, tmp_path, backend):
    if backend == "jax":
        pytest.importorskip("jax")
    from core.nets.models import load_model
    from training.store import RunStore

    runs = tmp_path / "runs"
    hosts = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    scratch_before = set(Path(tempfile.gettempdir()).glob("cnmc-worker*"))
    procs = []
    for index in range(2):
        env = {**os.environ, "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
               "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})}
        cmd = [sys.executable, "-m", "training", "run", "--devices", "multiworker", "--data-dir", str(synth_small),
               "--runs-dir", str(runs), "--cache-dir", str(runs / "cache"), "--image-size", "32",
               "--batch-size", "16", "--epochs", "2", "--samples-per-class", "32", "--no-early-stopping",
               "--loader-workers", "1", "--seed", "0"]
        log = open(tmp_path / f"worker{index}.log", "w+")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    # A worker that fails leaves the other waiting in a collective op: stop both at the first failure.
    deadline = time.time() + 600
    while any(p.poll() is None for p, _ in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p, _ in procs):
            break
        time.sleep(0.5)
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    outs = []
    for _, log in procs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    codes = [p.returncode for p, _ in procs]
    assert codes == [0, 0], "\n".join(f"worker {i} exited {c}:\n{out[-3000:]}" for i, (c, out) in
                                       enumerate(zip(codes, outs)))
    assert "this worker's share of the run completed" in outs[1]
    if backend == "jax":
        # each process fed half of every batch, and both report the same (global) metrics: one training
        assert all("feeds 8 of every 16 cells" in out for out in outs)
        epochs = [[l.split("(")[0] for l in out.splitlines() if l.startswith("epoch ")] for out in outs]
        assert len(epochs[0]) == 2 and epochs[0] == epochs[1], epochs

    store = RunStore(runs)
    listed = store.list_runs()
    assert len(listed) == 1, listed  # one run, the chief's
    run_id = listed.iloc[0]["id"]
    run = store.get_run(run_id)
    assert run["status"] == "completed", run["error"]
    assert ("2 workers (MultiWorkerMirroredStrategy)" if backend == "tensorflow" else
            "2 processes (jax.distributed, keras.distribution.DataParallel)") in run["device"]
    run_dir = store.run_dir(run_id)
    assert [d.name for d in runs.iterdir() if d.is_dir() and d.name not in ("cache", "label_overrides")] \
        == [run_dir.name]
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    model = load_model(str(run_dir / "best.keras"))
    assert model.predict(__import__("numpy").zeros((1, 32, 32, 3), "float32"), verbose=0).shape == (1, 2)
    # the worker's scratch store and cache are gone
    assert set(Path(tempfile.gettempdir()).glob("cnmc-worker*")) == scratch_before
