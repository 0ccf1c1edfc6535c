"""Helpers shared by the training tests (imported, not collected)."""
from __future__ import annotations

import time

from training.config import RunConfig


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
