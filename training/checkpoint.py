"""A run's memory: its checkpoints, `state.json`, and the rules for continuing from them.

A checkpoint is `checkpoints/eEEE-sSSSSS.keras` (weights, optimizer) plus `state.json` (epoch, step, the callbacks'
counters, the epoch's running metric sums, the best validation accuracy, a ledger of the batches trained), written
in that order, each atomically: `state.json` only ever names a complete checkpoint, so a kill at any instant leaves
the previous checkpoint valid. One is written at every epoch end and when a stop is requested (after the current
batch); `last.keras` is another name for the newest. Epoch rows go to the store before the checkpoint, so a kill
between the two repeats the epoch rather than leaving a gap. A resume continues at the step after the checkpoint.

Keras is imported only where a model is touched: the worker reads a run's state (`read_state`) before its stop
flag is installed, and importing Keras there would widen that window by many seconds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.data.atomic import atomic_path, atomic_write_text
from training.worker import Cancelled, StopFlag

if TYPE_CHECKING:
    import keras

    from training.store import RunStore

log = logging.getLogger("cnmc.trainer")

# The callbacks whose counters a resumed run must continue, and the attributes that hold them.
CALLBACK_STATE = {"ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
                  "EarlyStopping": ("wait", "best", "stopped_epoch")}
# What the trainer writes in a run folder, each through `atomic_path` (whose temporary files are `.NAME.*.tmp*`).
RUN_FILES = ("state.json", "best.keras", "last.keras", "history.csv", "predictions.csv", "summary.json")


# --- files --------------------------------------------------------------------------------------------------------
def save_model(model: keras.Model, path: Path) -> None:
    """`model.save` all or nothing (Keras picks the format by the `.keras` ending, so the temporary name has it)."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def _link(src: Path, dst: Path) -> None:
    """`dst` becomes another name of the complete file `src` (a hard link, a copy where links are refused)."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _json_number(v: Any) -> float | int | None:
    return None if v is None else float(v) if isinstance(v, (float, np.floating)) else int(v)


# --- resume rules -------------------------------------------------------------------------------------------------
def read_state(run_dir: Path) -> dict:
    """The newest complete checkpoint's state (`{}` before the first one)."""
    path = run_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def restore_point(run_dir: Path, resume: bool) -> tuple[dict, Path]:
    """The state to continue from and the checkpoint it names: `{}` for a new run, and for one killed before its
    first checkpoint (it starts again)."""
    state = read_state(run_dir) if resume else {}
    checkpoint = run_dir / state["checkpoint"] if "checkpoint" in state else run_dir / "last.keras"
    if resume and not checkpoint.exists():
        state = {}
    return state, checkpoint


def rewind(store: RunStore, run_id: str, run_dir: Path, state: dict, epochs: int) -> None:
    """Before a resume: the store's epoch rows and history.csv back to exactly the checkpointed epochs (a kill after
    an epoch's row repeats that epoch), no temporary file of a killed writer left behind, and an extension of a
    run that early stopping ended starts its patience afresh."""
    done = int(state.get("epoch", 0))
    _sweep_temporaries(run_dir)
    store.truncate_epochs(run_id, done)
    trim_history(run_dir, done)
    if state.get("stopped_early") and epochs > done:
        log.info("early stopping had ended this run at epoch %d; the extension starts its patience afresh", done)
        state["stopped_early"] = False
        state.get("callbacks", {}).get("EarlyStopping", {})["wait"] = 0


def check_steps(state: dict, steps: int) -> None:
    """An interrupted epoch continues only with the batches per epoch it was cut from (else its steps mean
    other cells)."""
    if int(state.get("step", 0)) and state.get("steps_per_epoch") != steps:
        raise ValueError(f"the checkpoint was taken with {state.get('steps_per_epoch')} steps per epoch, "
                         f"this configuration makes {steps}")


def trim_history(run_dir: Path, epochs_done: int) -> None:
    """history.csv keeps exactly the checkpointed epochs (a kill after its row was written repeats the epoch)."""
    import pandas as pd

    path = run_dir / "history.csv"
    if path.exists() and path.stat().st_size:
        table = pd.read_csv(path)
        with atomic_path(path) as tmp:
            table[table["epoch"] < epochs_done].to_csv(tmp, index=False)


def _sweep_temporaries(run_dir: Path) -> None:
    """A worker killed while writing leaves its temporary file (a uniquely named one, never reused): the resumed
    worker, the run folder's only writer of these files, removes them."""
    for name in RUN_FILES:
        for tmp in run_dir.glob(f".{name}.*.tmp*"):
            tmp.unlink(missing_ok=True)


# --- the callback -------------------------------------------------------------------------------------------------
class Checkpointer:
    """Writes the run's checkpoints during `fit`, streams its progress and epochs into the store, and turns a
    requested stop into a checkpoint then `Cancelled` (after the current batch; at an epoch's last batch the epoch
    is finished first). `callback()` is what `fit` gets; put it last, so it gives the other callbacks their saved
    counters back after they reset themselves. `state` is the run's state dict, updated in place."""

    def __init__(self, model: keras.Model, store: RunStore, run_id: str, run_dir: Path, stop: StopFlag,
                 steps: int, epochs: int, state: dict, callbacks: list, keep_best: bool):
        self.model, self.store, self.run_id, self.run_dir, self.stop = model, store, run_id, run_dir, stop
        self.steps, self.epochs, self.state, self.others, self.keep_best = steps, epochs, state, callbacks, keep_best
        self.skip = 0  # batches of the first epoch already trained before a resume
        self.restore_metrics: list | None = None
        self.t0, self.last, self.epoch, self.first = 0.0, 0.0, 0, 0

    def resume_mid_epoch(self, skip: int, metrics: list | None) -> None:
        """The next epoch is an interrupted one: its first `skip` batches are trained, `metrics` their sums."""
        self.skip, self.restore_metrics = skip, metrics

    def callback(self) -> keras.callbacks.Callback:
        """This checkpointer as the Keras callback `fit` calls."""
        import keras

        return keras.callbacks.LambdaCallback(
            on_train_begin=self.on_train_begin, on_epoch_begin=self.on_epoch_begin,
            on_train_batch_end=self.on_train_batch_end, on_test_begin=self.on_test_begin,
            on_epoch_end=self.on_epoch_end)

    def on_train_begin(self, logs: dict | None = None) -> None:
        """After the other callbacks reset themselves: give back their saved counters."""
        for cb in self.others:
            for attr, value in self.state.get("callbacks", {}).get(type(cb).__name__, {}).items():
                setattr(cb, attr, value)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Start the epoch's clock (a resumed epoch's from its time so far) and show it begun."""
        self.t0 = time.perf_counter() - (self.state.get("epoch_seconds", 0.0) if self.skip else 0.0)
        self.last, self.epoch, self.first = 0.0, epoch, self.skip
        self.store.set_progress(self.run_id, epoch, self.skip, self.steps)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Progress at most twice a second; a requested stop becomes a checkpoint here, so no batch is lost."""
        if self.restore_metrics is not None:  # add the interrupted epoch's running sums (metrics are
            self._add_metric_sums(self.restore_metrics)  # built by the first step, so only now)
            self.restore_metrics = None
        done, steps = self.skip + batch + 1, self.steps
        if self.stop and done < steps:  # at the last batch the epoch is finished instead, then stopped
            self.checkpoint(self.epoch, done)
            raise Cancelled(f"{self.stop.reason} at epoch {self.epoch + 1}, step {done}/{steps}")
        now = time.perf_counter()
        if now - self.last > 0.5 or done == steps:
            self.store.set_progress(self.run_id, self.epoch, done, steps)
            self.last = now

    def on_test_begin(self, logs: dict | None = None) -> None:
        """Show the validation phase (a long one must not look like a stalled epoch)."""
        self.store.set_progress(self.run_id, self.epoch, self.steps, self.steps, phase="validate")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """The epoch's row, `best.keras` when validation improved, then the checkpoint (in that order)."""
        import keras

        logs = dict(logs or {})
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["learning_rate"] = lr
        seconds = time.perf_counter() - self.t0
        self.store.log_epoch(self.run_id, epoch, logs, seconds)
        val = logs.get("val_accuracy")
        if self.keep_best and val is not None and val > (self.state.get("best_val_accuracy") or -1.0):
            save_model(self.model, self.run_dir / "best.keras")
            self.state["best_val_accuracy"] = float(val)
        self.state["stopped_early"] = bool(self.model.stop_training)
        self.skip = 0
        self.checkpoint(epoch + 1, 0)
        log.info("epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.2e (%.1f s)", epoch + 1,
                 logs.get("loss", np.nan), logs.get("accuracy", np.nan), logs.get("val_loss", np.nan),
                 logs.get("val_accuracy", np.nan), lr, seconds)
        if self.stop and epoch + 1 < self.epochs:
            raise Cancelled(f"{self.stop.reason} at the end of epoch {epoch + 1}")

    def _add_metric_sums(self, saved: list) -> None:
        import keras

        variables = [v for m in self.model.metrics for v in m.variables]
        if len(variables) != len(saved):
            log.warning("the epoch's running metrics could not be restored (%d saved, %d now): its "
                        "loss/accuracy cover the batches after the resume only", len(saved), len(variables))
            return
        for v, s in zip(variables, saved):
            v.assign(keras.ops.convert_to_numpy(v) + np.asarray(s, dtype=v.dtype))

    def checkpoint(self, epoch: int, step: int) -> None:
        """Write the state after `step` batches of epoch `epoch` (0-based; step 0 = at its start)."""
        self._record(epoch, step)
        folder = self.run_dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        name = f"e{epoch:03d}-s{step:05d}.keras"
        save_model(self.model, folder / name)
        self.state["checkpoint"] = f"checkpoints/{name}"
        atomic_write_text(self.run_dir / "state.json", json.dumps(self.state, indent=2))
        _link(folder / name, self.run_dir / "last.keras")
        for old in folder.glob("*.keras"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def _record(self, epoch: int, step: int) -> None:
        """The state's part of a checkpoint: position, ledger, the callbacks' counters, the running metric sums."""
        import keras

        trained_in = self.epoch if step else epoch - 1
        end = step if step else self.steps
        if end > self.first:
            self.state.setdefault("ledger", []).append([trained_in, self.first, end])
        self.first = step
        self.state.update(
            epoch=epoch, step=step, steps_per_epoch=self.steps,
            epoch_seconds=time.perf_counter() - self.t0 if step else 0.0,
            callbacks={type(cb).__name__: {a: _json_number(getattr(cb, a)) for a in attrs}
                       for cb in self.others for name, attrs in CALLBACK_STATE.items() if type(cb).__name__ == name},
            metrics=[keras.ops.convert_to_numpy(v).tolist()
                     for m in self.model.metrics for v in m.variables] if step else None)
