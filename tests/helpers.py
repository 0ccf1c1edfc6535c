"""Helpers shared by the training tests (imported, not collected)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from training.config import RunConfig

REPO = Path(__file__).resolve().parent.parent

# the real-browser tests: Debian's Chromium (never a downloaded browser), its flags, where screenshots land
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"



def tiny(data, runs, **kw) -> RunConfig:
    """A training job small enough for CI: Solution A at 32 px, a few batches per epoch."""
    base = dict(architecture="solution_a", data_dir=str(data), runs_dir=str(runs), cache_dir=str(runs / "cache"),
                image_size=32, batch_size=16, epochs=2, samples_per_class=32, learning_rate=1e-3,
                early_stopping=False, loader_workers=1)
    base.update(kw)
    return RunConfig(**base)


def wait_for(pred, timeout=180, every=0.1):
    """The first truthy value of `pred()`, polled; TimeoutError if none comes in time."""
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not reached")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(runs, data, tmp_path, port: int | None = None, env: dict | None = None, args=()):
    """The dashboard (`streamlit run streamlit_app.py`) on loopback over the run store `runs`, until the block
    ends; yields its URL. `env` and `args` add environment variables and server flags (e.g. a secrets file)."""
    import pytest

    port = port or free_port()
    env = dict(os.environ, CNMC_RUNS_DIR=str(runs), CNMC_DEMO_DATA=str(data), CNMC_DATA_ROOTS=str(tmp_path),
               PYTHONPATH=str(REPO), **(env or {}))
    log = Path(tmp_path) / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true", *args],
                            cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 60
    while time.time() < end:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the app did not start:\n" + log.read_text())
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
