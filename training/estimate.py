"""How long a run will take on this machine, said before it is launched.

Two sources, and the estimate says which it used: the measured speed of an earlier run in the store with the
same architecture, input size, batch and device (seconds per epoch over cells per epoch), or, when there is none,
a handful of training batches timed here on random crops of the run's size (compile excluded). Both count the
training batches; building the crop cache, validation and calibration add a little (said in the text).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from training.config import RunConfig
from training.store import RunStore


@dataclass(frozen=True)
class Estimate:
    seconds: float  # the whole schedule's training batches
    seconds_per_cell: float
    basis: str  # "measured" (an earlier run) or "timed" (batches timed now)
    detail: str  # where the speed comes from, in words

    def text(self, cfg: RunConfig) -> str:
        """One plain line: about how long, for what, and from which source."""
        epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} of {2 * cfg.samples_per_class:,} cells"
        stop = ", less if early stopping ends it" if cfg.early_stopping and cfg.split != "all" else ""
        return (f"About {_duration(self.seconds)} on this machine for {epochs}{stop} "
                f"({self.detail}; the crop cache, validation and calibration add a little).")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds / 10) * 10):.0f} seconds"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} minutes"
    return f"{minutes / 60:.1f} hours"


def device_label(cfg: RunConfig) -> str:
    """This machine's device as the run store records it (the same words a run's `device` column holds)."""
    from training import hardware

    acc = hardware.detect()
    return acc.describe(hardware.precision_policy(cfg.mixed_precision, acc))


def measured(cfg: RunConfig, store: RunStore, device: str) -> Estimate | None:
    """Speed of the latest run in `store` with the same architecture, input size, batch and device that logged
    at least one epoch."""
    cfg = cfg.resolved()
    runs = store.list_runs()
    for run_id, dev in zip(runs["id"], runs["device"]):
        if dev != device:
            continue
        other = store.get_run(run_id)["config"]
        same = (other.get("architecture"), other.get("image_size"), other.get("batch_size"),
                other.get("freeze_backbone", False))
        if same != (cfg.architecture, cfg.image_size, cfg.batch_size, cfg.freeze_backbone):
            continue
        epochs = store.epochs(run_id)
        secs = epochs["seconds"].dropna() if len(epochs) else []
        if len(secs) == 0 or not other.get("samples_per_class"):
            continue
        per_cell = float(np.median(secs)) / (2 * other["samples_per_class"])
        total = per_cell * 2 * cfg.samples_per_class * cfg.epochs
        return Estimate(total, per_cell, "measured",
                        f"measured: run {run_id} ({cfg.architecture} at {cfg.image_size} px, batch "
                        f"{cfg.batch_size}) trained {1 / per_cell:,.0f} cells/s here")
    return None


def timed(cfg: RunConfig, batches: int = 3) -> Estimate:
    """Time `batches` training steps of the run's model on random crops (after one step that compiles)."""
    import keras

    from training.trainer import build_model

    cfg = dataclasses.replace(cfg.resolved(), init="none")  # speed does not depend on where weights start
    model = build_model(cfg, np.full(3, 0.5, "float32"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(rng.integers(0, 2, cfg.batch_size), 2)
    model.train_on_batch(x, y)  # compiles
    t0 = time.perf_counter()
    for _ in range(batches):
        model.train_on_batch(x, y)
    per_cell = (time.perf_counter() - t0) / (batches * cfg.batch_size)
    keras.utils.clear_session()
    total = per_cell * 2 * cfg.samples_per_class * cfg.epochs
    return Estimate(total, per_cell, "timed",
                    f"timed now: {batches} batches of {cfg.batch_size} at {cfg.image_size} px, "
                    f"{1 / per_cell:,.0f} cells/s")


def estimate(cfg: RunConfig, store: RunStore | None = None, batches: int = 3,
             time_now: bool = True) -> Estimate | None:
    """The run's duration: from an earlier run's measured speed when the store has one, else timed now (None when
    there is no earlier run and `time_now` is off: timing a large network's batches waits for its compile)."""
    cfg = cfg.resolved()
    if store is not None:
        found = measured(cfg, store, device_label(cfg))
        if found is not None:
            return found
    return timed(cfg, batches) if time_now else None
