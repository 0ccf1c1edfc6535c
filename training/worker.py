"""What keeps a training worker in step with the world around it, whatever it is computing: its stop flag (SIGTERM,
SIGINT or the run store's cancel flag, honoured after the current batch), its heartbeat thread (proof of life for
the store, and the way a cancel from another host reaches it) and the device queue (one job per device per
machine, a kernel lock that dies with its holder). No Keras here: a queued worker waits without loading it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from training.hardware import Accelerators
    from training.store import RunStore

log = logging.getLogger("cnmc.trainer")  # the trainer's logger: the worker's lines read as the trainer's own


class Cancelled(Exception):
    """A requested stop, raised where the job can stop cleanly (after a batch, while queued), so the run ends
    `cancelled` with its work kept rather than `failed`."""


class StopFlag:
    """The one question every phase of a job asks: should it stop? Set by a signal, a cancel in the run store (the
    heartbeat) or a test; true once set."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None
        self.previous: dict = {}

    @property
    def reason(self) -> str:
        """What asked for the stop, for the run's error text."""
        return self.signal_name or "stop requested"

    def check(self, when: str) -> None:
        """Raise `Cancelled` (naming the reason and `when`) if a stop was requested."""
        if self:
            raise Cancelled(f"{self.reason} {when}")

    def install(self) -> None:
        """SIGTERM/SIGINT set the flag (main thread only); `uninstall` gives the previous handlers back."""
        def handler(signum, _frame):
            self.signal_name = signal.Signals(signum).name
            self.event.set()

        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        """Put back the signal handlers `install` replaced."""
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous = {}

    def __bool__(self) -> bool:
        return self.event.is_set()


class Heartbeat:
    """Beats into the store from a background thread for the worker's whole life, whatever phase it is in
    (indexing, cache build, training, validation, prediction), so a live worker is never declared lost. Each beat
    also reads the run's cancel flag (`RunStore.request_cancel`): a cancel from a dashboard on another host, or
    one that could not prove this process is the worker, stops the run like SIGTERM does."""

    def __init__(self, store: RunStore, run_id: str, every: float | None = None, stop: StopFlag | None = None):
        from training.store import heartbeat_interval

        self.store, self.run_id, self.every, self.stop = store, run_id, every or heartbeat_interval(), stop
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - a busy database must not kill the worker; said in its log
                log.warning("heartbeat not written (%s); retrying in %.0f s", exc, self.every)

    def _beat(self) -> None:
        if self.store.heartbeat(self.run_id) and self.stop is not None and not self.stop:
            self.stop.signal_name = "cancel requested in the run store"
            self.stop.event.set()

    def __enter__(self) -> Heartbeat:
        self._beat()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def lock_dir() -> Path:
    """Where device locks live: one folder per machine and user (not per run store)."""
    base = os.environ.get("CNMC_LOCK_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cnmc", "locks")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def device_key(acc: Accelerators) -> str:
    """The device a job occupies: the CPU, or the visible GPUs (by CUDA_VISIBLE_DEVICES when set)."""
    if not acc.gpus:
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    return "gpu-" + "".join(c if c.isalnum() else "_" for c in visible)


class DeviceQueue:
    """One job at a time per device per machine, whatever the run store: an exclusive flock on a file in the
    user's cache folder (`lock_dir()`), released by the kernel when the worker dies."""

    def __init__(self, key: str, stop: StopFlag, run_id: str = "", on_wait: Callable[[str], object] | None = None):
        self.path, self.stop, self.run_id = lock_dir() / f"device-{key}.lock", stop, run_id
        self.key, self.on_wait = key, on_wait  # on_wait(reason): told why this run waits, again when that changes
        self.fh = None

    def holder(self) -> str:
        """Why a run waits: the run (and process) holding the device, as the holder wrote it in the lock file."""
        try:
            pid, _, run = self.path.read_text().strip().partition(" ")
        except OSError:
            pid, run = "", ""
        who = f"run {run.strip()}" if run.strip() else "another run"
        return f"waiting for {who}{f' (process {pid})' if pid else ''} on this device ({self.key})"

    def __enter__(self) -> DeviceQueue:
        self.fh = open(self.path, "a+")
        said = None
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self.stop:
                    self.fh.close()
                    raise Cancelled("cancelled while queued")
                said = self._tell_why(said)
                time.sleep(0.5)
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()} {self.run_id}\n")
        self.fh.flush()
        return self

    def _tell_why(self, said: str | None) -> str:
        """Log and report (`on_wait`) why this run waits, when that differs from what was `said` last."""
        why = self.holder()
        if why != said:
            if said is None:
                log.info("device busy with another run (%s): queued, %s", self.path, why)
            if self.on_wait is not None:
                try:
                    self.on_wait(why)
                except Exception:  # noqa: BLE001 - a message that cannot be shown never stops the queue
                    log.exception("could not record why run %s waits", self.run_id)
        return why

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
