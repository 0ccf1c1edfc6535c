"""`train(config)`: one training job from a `RunConfig` to a completed run folder.

Data: index -> split (saved) -> crop cache -> class-balanced batches. Model: the registry, normalisation and
augmentation inside. Keras' own callbacks do the report's schedule (ReduceLROnPlateau, EarlyStopping,
ModelCheckpoint, CSVLogger); `StoreCallback` streams epochs and batch progress into the run store and turns a
stop request (SIGTERM/SIGINT or the dashboard's Cancel) into a checkpoint and a `cancelled` run.
"""
from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from training.config import RunConfig
from training.store import RunStore

log = logging.getLogger("cnmc.trainer")
CLASSES = ("hem", "all")


class Cancelled(Exception):
    """Raised inside fit after the current batch when a stop was requested."""


class StopFlag:
    def __init__(self):
        self.event = threading.Event()
        self.signal_name: str | None = None

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
        for sig, old in getattr(self, "previous", {}).items():
            signal.signal(sig, old)
        self.previous = {}

    def __bool__(self) -> bool:
        return self.event.is_set()


# ---------------------------------------------------------------------------------------------------------------
def _atomic_save(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _atomic_json(data, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _atomic_link(src: Path, dst: Path) -> None:
    """`dst` becomes another name of the complete file `src` (a hard link, a copy where links are refused)."""
    import shutil

    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# The callbacks whose counters a resumed run must continue, and the attributes that hold them.
_CALLBACK_STATE = {"ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
                   "EarlyStopping": ("wait", "best", "stopped_epoch")}


def _json_number(v):
    return None if v is None else float(v) if isinstance(v, (float, np.floating)) else int(v)


def _checkpointer(store: RunStore, run_id: str, run_dir: Path, stop: StopFlag, steps: int, epochs: int,
                  state: dict, callbacks: list, keep_best: bool):
    """The run's memory, as a Keras callback.

    A checkpoint is `checkpoints/eEEE-sSSSSS.keras` (weights, optimizer) plus `state.json` (epoch, step, the
    callbacks' counters, the epoch's running metric sums, the best validation accuracy, a ledger of the batches
    trained), written in that order, each atomically: `state.json` only ever names a complete checkpoint, so a
    kill at any instant leaves the previous checkpoint valid. One is written at every epoch end and when a stop
    is requested (after the current batch); `last.keras` is another name for the newest. Epoch rows go to the
    store before the checkpoint, so a kill between the two repeats the epoch rather than leaving a gap.
    """
    import keras

    class Checkpointer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.skip = 0  # batches of the first epoch already trained before a resume
            self.restore_metrics: list | None = None

        def on_train_begin(self, logs=None):  # after the other callbacks reset themselves: give back their state
            for cb in callbacks:
                for attr, value in state.get("callbacks", {}).get(type(cb).__name__, {}).items():
                    setattr(cb, attr, value)

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter() - (state.get("epoch_seconds", 0.0) if self.skip else 0.0)
            self.last, self.epoch, self.first = 0.0, epoch, self.skip
            store.set_progress(run_id, epoch, self.skip, steps)

        def on_train_batch_end(self, batch, logs=None):
            if self.restore_metrics is not None:  # add the interrupted epoch's running sums (metrics are
                self._add_metric_sums(self.restore_metrics)  # built by the first step, so only now)
                self.restore_metrics = None
            done = self.skip + batch + 1
            if stop and done < steps:  # at the last batch the epoch is finished instead, then stopped
                self.checkpoint(self.epoch, done)
                raise Cancelled(f"{stop.signal_name or 'stop requested'} at epoch {self.epoch + 1}, "
                                f"step {done}/{steps}")
            now = time.perf_counter()
            if now - self.last > 0.5 or done == steps:
                store.set_progress(run_id, self.epoch, done, steps)
                self.last = now

        def on_test_begin(self, logs=None):
            store.set_progress(run_id, self.epoch, steps, steps, phase="validate")

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["learning_rate"] = lr
            seconds = time.perf_counter() - self.t0
            store.log_epoch(run_id, epoch, logs, seconds)
            val = logs.get("val_accuracy")
            if keep_best and val is not None and val > (state.get("best_val_accuracy") or -1.0):
                _atomic_save(self.model, run_dir / "best.keras")
                state["best_val_accuracy"] = float(val)
            state["stopped_early"] = bool(self.model.stop_training)
            self.skip = 0
            self.checkpoint(epoch + 1, 0)
            log.info("epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.2e (%.1f s)", epoch + 1,
                     logs.get("loss", np.nan), logs.get("accuracy", np.nan), logs.get("val_loss", np.nan),
                     logs.get("val_accuracy", np.nan), lr, seconds)
            if stop and epoch + 1 < epochs:
                raise Cancelled(f"{stop.signal_name or 'stop requested'} at the end of epoch {epoch + 1}")

        def _add_metric_sums(self, saved: list) -> None:
            variables = [v for m in self.model.metrics for v in m.variables]
            if len(variables) != len(saved):
                log.warning("the epoch's running metrics could not be restored (%d saved, %d now): its "
                            "loss/accuracy cover the batches after the resume only", len(saved), len(variables))
                return
            for v, s in zip(variables, saved):
                v.assign(keras.ops.convert_to_numpy(v) + np.asarray(s, dtype=v.dtype))

        def checkpoint(self, epoch: int, step: int) -> None:
            """Write the state after `step` batches of epoch `epoch` (0-based; step 0 = at its start)."""
            trained_in = self.epoch if step else epoch - 1
            end = step if step else steps
            if end > self.first:
                state.setdefault("ledger", []).append([trained_in, self.first, end])
            self.first = step
            state.update(epoch=epoch, step=step, steps_per_epoch=steps,
                         epoch_seconds=time.perf_counter() - self.t0 if step else 0.0,
                         callbacks={type(cb).__name__: {a: _json_number(getattr(cb, a)) for a in attrs}
                                    for cb in callbacks for name, attrs in _CALLBACK_STATE.items()
                                    if type(cb).__name__ == name},
                         metrics=[keras.ops.convert_to_numpy(v).tolist()
                                  for m in self.model.metrics for v in m.variables] if step else None)
            folder = run_dir / "checkpoints"
            folder.mkdir(exist_ok=True)
            name = f"e{epoch:03d}-s{step:05d}.keras"
            _atomic_save(self.model, folder / name)
            state["checkpoint"] = f"checkpoints/{name}"
            _atomic_json(state, run_dir / "state.json")
            _atomic_link(folder / name, run_dir / "last.keras")
            for old in folder.glob("*.keras"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    return Checkpointer()


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

    def __enter__(self):
        self._beat()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def lock_dir() -> Path:
    """Where device locks live: one folder per machine and user (not per run store)."""
    base = os.environ.get("CNMC_LOCK_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cnmc", "locks")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def device_key(acc) -> str:
    """The device a job occupies: the CPU, or the visible GPUs (by CUDA_VISIBLE_DEVICES when set)."""
    if not acc.gpus:
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    return "gpu-" + "".join(c if c.isalnum() else "_" for c in visible)


class DeviceQueue:
    """One job at a time per device per machine, whatever the run store: an exclusive flock on a file in the
    user's cache folder (`lock_dir()`), released by the kernel when the worker dies."""

    def __init__(self, key: str, stop: StopFlag, run_id: str = "", on_wait=None):
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

    def __enter__(self):
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
                why = self.holder()
                if why != said:
                    if said is None:
                        log.info("device busy with another run (%s): queued, %s", self.path, why)
                    if self.on_wait is not None:
                        try:
                            self.on_wait(why)
                        except Exception:  # noqa: BLE001 - a message that cannot be shown never stops the queue
                            log.exception("could not record why run %s waits", self.run_id)
                    said = why
                time.sleep(0.5)
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()} {self.run_id}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("cnmc")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        root.addHandler(logging.StreamHandler())
    return handler


# ---------------------------------------------------------------------------------------------------------------
def _log_split(split, cfg: RunConfig) -> None:
    """Subjects and cells per class per split, and each split lacking a class in plain words (warned, not
    refused: a validation split of one class leaves the decision rule at its defaults)."""
    from core.data.splits import split_counts, split_warnings

    counts = split_counts(split)
    for name, row in counts.iterrows():
        log.info("split %s: %s", name, ", ".join(f"{c} {int(row.get('cells_' + c, 0))} cells of "
                                                  f"{int(row.get('subjects_' + c, 0))} subjects"
                                                  for c in ("all", "hem")))
    for w in split_warnings(split):
        log.warning("split %s: %s", cfg.split, w)
        if w.startswith("the validation split") and cfg.early_stopping:
            log.warning("early stopping watches validation accuracy over one class: it may stop early or late")


def prepare_data(cfg: RunConfig, run_dir: Path, reuse_split: bool):
    """Index, split (or reload the run's split), build/reuse the crop cache; returns (split, cache, rows)."""
    from core.data.dataset import index
    from core.image.preprocessing import CropCache
    from core.data.splits import load_split, make_split, save_split

    manifest, problems = index(cfg.data_dir)
    if len(problems):
        problems.to_csv(run_dir / "problems.csv", index=False)
        log.warning("%d files excluded by the indexer (see problems.csv)", len(problems))
    split_path = run_dir / "split.csv"
    if reuse_split and split_path.exists():
        split = load_split(split_path)
    else:
        if cfg.label_overrides:
            from core.data.labels import apply_overrides, load_overrides

            manifest, changed = apply_overrides(manifest, load_overrides(cfg.label_overrides))
            log.info("label overrides from %s: %d labels changed (marked in split.csv, column label_overridden)",
                     cfg.label_overrides, changed)
        split = make_split(manifest, cfg.split, seed=cfg.seed, val_fold=cfg.val_fold)
        save_split(split, split_path, root=cfg.data_dir)
    if split.attrs.get("leaks_subjects"):
        log.warning("split %s: %s", cfg.split, split.attrs["note"])
    _log_split(split, cfg)
    files = manifest.set_index("path").loc[split["path"], ["size", "mtime_ns"]].reset_index()
    cache = CropCache.build(files, cfg.cache_dir, size=cfg.image_size, margin=cfg.crop_margin, progress=False)
    if cache.failures:
        cache.problems().to_csv(run_dir / "cache_problems.csv", index=False)
        log.warning("%d cells could not be decoded and are left out", len(cache.failures))
    rows = cache.rows(split["path"])
    keep = cache.valid[rows]
    split, rows = split[keep].reset_index(drop=True), rows[keep]
    return split, cache, rows


def train(config: RunConfig, store: RunStore | None = None, run_id: str | None = None,
          resume: bool = False, stop: StopFlag | None = None, epochs: int | None = None) -> str:
    """Run one job to its end and return the run id; the run's final status says how it ended.

    `resume=True` continues `run_id` from its checkpoint; `epochs` there extends (or restates) its schedule,
    the only setting a resume may change. With `devices="multiworker"` (TF_CONFIG set), only the chief records
    a run; another worker returns "" when its share ends well and raises RuntimeError otherwise.
    """
    scratch = None
    if config.devices == "multiworker":
        from training import hardware

        index, workers, chief = hardware.worker_role()
        hardware.start_multiworker()  # before any other TensorFlow op or JAX computation (their rule)
        if not chief:
            # Every worker runs the same steps, saves and evaluations (they hold collective ops), but only the
            # chief's run is recorded: a worker trains in a private scratch store and crop cache, removed after.
            if resume:
                raise ValueError("resume a multiworker run on the chief only after restarting every worker")
            scratch = Path(tempfile.mkdtemp(prefix=f"cnmc-worker{index}-"))
            config = dataclasses.replace(config.resolved(), runs_dir=str(scratch / "runs"),
                                         cache_dir=str(scratch / "cache"))
            store, run_id = RunStore(config.runs_dir), None
        log.info("multiworker: worker %d of %d%s", index, workers, " (chief)" if chief else "")
    store = store or RunStore(config.runs_dir)  # a non-chief worker never opens the shared store
    if scratch is None:
        return _run(config, store, run_id, resume, stop, epochs)
    try:
        run = store.get_run(_run(config, store, run_id, resume, stop, epochs, worker=True))
        if run["status"] != "completed":
            raise RuntimeError(f"multiworker worker {index}: {run['status']}: {run['error']}")
        return ""
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(config: RunConfig, store: RunStore, run_id: str | None, resume: bool, stop: StopFlag | None,
         epochs: int | None, worker: bool = False) -> str:
    if resume:
        if run_id is None:
            raise ValueError("resume needs a run id")
        cfg = RunConfig.from_dict(store.get_run(run_id)["config"])
        if epochs is not None and epochs != cfg.epochs:
            done = _read_state(store.run_dir(run_id)).get("epoch", 0)
            if epochs < done:
                raise ValueError(f"run {run_id} has already trained {done} epochs; --epochs {epochs} would undo them")
            cfg = dataclasses.replace(cfg, epochs=int(epochs))
            store.update_config(run_id, cfg.to_dict())
    else:
        cfg = config.resolved()
        if run_id is None:  # a start that cannot be had fails here, before any run is registered or folder made
            from core.nets.models import ensure_init

            ensure_init(cfg.architecture, cfg.init)
        run_id = run_id or store.create_run(cfg.to_dict())
        store.update_config(run_id, cfg.to_dict())
    run_dir = store.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    handler = _setup_logging(run_dir)
    stop = StopFlag() if stop is None else stop
    stop.install()
    store.claim(run_id)
    try:
        with Heartbeat(store, run_id, stop=stop):
            from training import hardware

            acc = hardware.detect()
            # a non-chief worker queues on its own key: the chief may share its machine (one lock per host)
            key = device_key(acc) + (f"-worker{hardware.worker_role()[0]}" if worker else "")
            with DeviceQueue(key, stop, run_id, on_wait=lambda why: store.set_phase(run_id, why)):
                _train(cfg, store, run_id, run_dir, resume, stop, acc)
    except Cancelled as exc:
        log.info("run %s cancelled (%s)", run_id, exc)
        store.finish(run_id, "cancelled", f"cancelled: {exc}")
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then re-raised
        tb = traceback.format_exc()
        log.error("run %s failed:\n%s", run_id, tb)
        store.finish(run_id, "failed", tb)
        if not isinstance(exc, Exception):
            raise
    finally:
        stop.uninstall()
        logging.getLogger("cnmc").removeHandler(handler)
        handler.close()
    return run_id


def _read_state(run_dir: Path) -> dict:
    """The newest complete checkpoint's state (`{}` before the first one)."""
    path = run_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _trim_history(run_dir: Path, epochs_done: int) -> None:
    """history.csv keeps exactly the checkpointed epochs (a kill after its row was written repeats the epoch)."""
    import pandas as pd

    path = run_dir / "history.csv"
    if path.exists() and path.stat().st_size:
        table = pd.read_csv(path)
        _atomic_csv(table[table["epoch"] < epochs_done], path)


def _train(cfg: RunConfig, store: RunStore, run_id: str, run_dir: Path, resume: bool, stop: StopFlag,
           acc) -> None:
    import keras

    from core.nets.models import load_model
    from training import hardware
    from training.data import BalancedBatches, CacheBatches

    keras.utils.set_random_seed(cfg.seed)
    policy = hardware.precision_policy(cfg.mixed_precision, acc)
    keras.mixed_precision.set_dtype_policy(policy)
    device = acc.describe(policy)
    device += hardware.describe_workers(cfg.devices)
    shard = hardware.data_shard(cfg.devices)  # (0, 1) but under JAX multi-process: this process's slice
    if shard[1] > 1:
        log.info("process %d of %d feeds %d of every %d cells of a batch", shard[0], shard[1],
                 cfg.batch_size // shard[1], cfg.batch_size)
    store.start(run_id, device)
    log.info("run %s on %s; config: %s", run_id, device, json.dumps(cfg.to_dict()))

    store.set_progress(run_id, 0, 0, 0, phase="preparing data")
    split, cache, rows = prepare_data(cfg, run_dir, reuse_split=resume)
    if stop:
        raise Cancelled(f"{stop.signal_name or 'stop requested'} while preparing data")
    labels = (split["label"] == "all").to_numpy().astype(int)
    part = split["split"].to_numpy()
    train_rows = rows[part == "train"]
    train_labels = labels[part == "train"]
    val_rows, val_labels = rows[part == "val"], labels[part == "val"]
    no_val = cfg.split == "all"  # a final model: fixed epochs, the last one kept
    if len(val_rows) == 0 and not no_val:
        raise ValueError("the validation split is empty")
    log.info("cells: train %d, val %d, test %d (split %s)", len(train_rows), len(val_rows),
             int((part == "test").sum()), cfg.split)

    state = _read_state(run_dir) if resume else {}
    checkpoint = run_dir / state["checkpoint"] if "checkpoint" in state else run_dir / "last.keras"
    if resume and not checkpoint.exists():
        state = {}  # killed before its first checkpoint: start again
    initial_epoch, skip = int(state.get("epoch", 0)), int(state.get("step", 0))
    if resume:
        store.truncate_epochs(run_id, initial_epoch)
        _trim_history(run_dir, initial_epoch)
        if state.get("stopped_early") and cfg.epochs > initial_epoch:
            log.info("early stopping had ended this run at epoch %d; the extension starts its patience afresh",
                     initial_epoch)
            state["stopped_early"] = False
            state.get("callbacks", {}).get("EarlyStopping", {})["wait"] = 0
    with hardware.strategy_scope(cfg.devices, acc):
        if state:
            model = load_model(str(checkpoint), compile=True)
            log.info("resuming at epoch %d, step %d of its %s", initial_epoch + 1, skip + 1,
                     state.get("steps_per_epoch"))
        else:
            mean = input_mean(cfg, cache.array, train_rows)
            state["train_mean"] = mean.tolist()
            model = build_model(cfg, mean)
    if cfg.devices == "multiworker" and acc.backend == "tensorflow":
        hardware.fix_multiworker_build(model)
    pools = [train_rows[train_labels == c] for c in (0, 1)]
    loader = dict(workers=cfg.loader_workers, use_multiprocessing=False, max_queue_size=8)

    def batches(first_epoch: int, epochs: int, skip: int = 0) -> BalancedBatches:
        return BalancedBatches(cache.array, pools, cfg.samples_per_class, cfg.batch_size, seed=cfg.seed,
                               first_epoch=first_epoch, epochs=epochs, skip=skip, shard=shard, **loader)

    steps = batches(0, 1).steps
    if skip and state.get("steps_per_epoch") != steps:
        raise ValueError(f"the checkpoint was taken with {state.get('steps_per_epoch')} steps per epoch, "
                         f"this configuration makes {steps}")
    if no_val:
        val_data = None
        log.info("split all: no validation; %d fixed epochs, the last one is kept", cfg.epochs)
    elif cfg.val_augmented and shard[1] > 1:
        raise ValueError("val_augmented is not supported in JAX multi-process training: validate on the "
                         "validation split's cells (the default)")
    elif cfg.val_augmented:
        log.warning("validation set is augmented and class-balanced (the report's protocol): optimistic")
        val_data = _augmented_validation(model, cache.array, val_rows, val_labels, cfg)
    else:
        val_data = CacheBatches(cache.array, val_rows, val_labels, cfg.batch_size, shard=shard, **loader)
    callbacks = [] if no_val else [
        keras.callbacks.ReduceLROnPlateau(monitor="val_accuracy", mode="max", factor=cfg.lr_factor,
                                          patience=cfg.lr_patience, min_lr=cfg.min_lr)]
    callbacks.append(keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume))
    if cfg.early_stopping and not no_val:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                                       patience=cfg.es_patience))
    if cfg.tensorboard and importlib.util.find_spec("tensorflow") is None:
        log.warning("run %s: no TensorBoard logs: Keras writes them with TensorFlow's summary ops, and TensorFlow "
                    "is not installed here (backend %s)", run_id, keras.backend.backend())
    elif cfg.tensorboard:
        callbacks.append(_tensorboard(cfg, model, cache.array, train_rows, run_dir))
    keeper = _checkpointer(store, run_id, run_dir, stop, steps, cfg.epochs, state, list(callbacks),
                           keep_best=not no_val)
    callbacks.append(keeper)  # last: it restores the others' counters after they reset themselves
    if skip and initial_epoch < cfg.epochs:  # finish the interrupted epoch from the batch after the stop
        keeper.skip, keeper.restore_metrics = skip, state.get("metrics")
        model.fit(batches(initial_epoch, 1, skip), validation_data=val_data, epochs=initial_epoch + 1,
                  initial_epoch=initial_epoch, steps_per_epoch=steps - skip, callbacks=callbacks, verbose=0)
        initial_epoch += 1
    if initial_epoch < cfg.epochs and not state.get("stopped_early"):
        model.fit(batches(initial_epoch, cfg.epochs - initial_epoch), validation_data=val_data, epochs=cfg.epochs,
                  initial_epoch=initial_epoch, steps_per_epoch=steps, callbacks=callbacks, verbose=0)
    if stop:
        raise Cancelled(f"{stop.signal_name or 'stop requested'} after training")
    store.set_progress(run_id, cfg.epochs, 0, 0, phase="predicting")
    best = run_dir / "best.keras"
    if no_val:
        _atomic_save(model, best)
    if shard[1] > 1:  # what follows (predictions, rule, gate) is every process's own, on its own device
        keras.distribution.set_distribution(None)
    final = load_model(str(best)) if best.exists() else model
    held_out = np.isin(part, ["val", "test"])
    out = split[["path", "subject", "label", "split"]][held_out].copy()
    out["prob_all"] = predict_rows(final, cache.array, rows[held_out], cfg.batch_size) if held_out.any() else []
    _atomic_csv(out, run_dir / "predictions.csv")
    store.set_progress(run_id, cfg.epochs, 0, 0, phase="calibrating")
    fit_rule_and_gate(cfg, final, split, cache.array, rows, out, run_dir)
    test = out[out["split"] == "test"]
    summary = {"test_cells": int(len(test)), "best_val_accuracy": state.get("best_val_accuracy"),
               "split": cfg.split, "data_dir": str(cfg.data_dir), "device": store.get_run(run_id)["device"],
               "epochs_trained": int(state.get("epoch", 0)),
               "labels_overridden": int(split["label_overridden"].sum()) if "label_overridden" in split else 0,
               "batches_trained": int(sum(end - first for _, first, end in state.get("ledger", [])))}
    if len(test):
        summary["test_accuracy"] = float(((test["prob_all"] >= 0.5) == (test["label"] == "all")).mean())
    _atomic_json(summary, run_dir / "summary.json")
    log.info("finished: %s", json.dumps(summary))
    store.finish(run_id, "completed")


def _tensorboard(cfg: RunConfig, model, images: np.ndarray, rows: np.ndarray, run_dir: Path, n: int = 8):
    """Keras' TensorBoard callback on `<run>/tensorboard` (epoch scalars, learning rate), plus, once, a few
    training cells as the augmentation layers show them to the model."""
    import keras

    log_dir = run_dir / "tensorboard"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        pick = np.sort(np.random.default_rng(cfg.seed).choice(rows, min(n, len(rows)), replace=False))
        cells = np.asarray(images[pick], dtype="float32")
        aug = model.get_layer("augmentation") if cfg.augment and "augmentation" in [l.name for l in model.layers] \
            else None
        seen = keras.ops.convert_to_numpy(aug(cells, training=True)) if aug is not None else cells
        with tf.summary.create_file_writer(str(log_dir / "samples")).as_default():
            tf.summary.image("augmented training cells", np.clip(seen, 0, 255).astype("uint8"), step=0,
                             max_outputs=len(pick))
    class TensorBoard(keras.callbacks.TensorBoard):
        def on_epoch_end(self, epoch, logs=None):  # the learning rate too, with or without ReduceLROnPlateau
            logs = dict(logs or {})
            logs.setdefault("learning_rate", float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            super().on_epoch_end(epoch, logs)

    return TensorBoard(log_dir=str(log_dir), write_graph=False, update_freq="epoch", profile_batch=0)


def _atomic_csv(table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)


def fit_rule_and_gate(cfg: RunConfig, model, split, images: np.ndarray, rows: np.ndarray, preds,
                      run_dir: Path, max_images: int = 400, max_crops: int = 2000) -> None:
    """Every run ends with its decision rule (temperature, threshold, review band: `calibration.json`) and its
    out-of-distribution gate (`gate.json`), fitted on its own validation split, so no model is ever used
    without them. Without validation cells (split `all`) the rule keeps its defaults and says so."""
    from core.decide.calibration import DecisionRule
    from core.decide.gate import fit_gate
    from core.data.imageio import read_image

    val = preds[preds["split"] == "val"]
    yv = (val["label"] == "all").to_numpy().astype(int)
    if len(np.unique(yv)) == 2:
        rule = DecisionRule.fit(yv, val["prob_all"].to_numpy(), cfg.target_sensitivity, cfg.review_band,
                                fitted_on=f"validation split ({len(val)} cells, {val['subject'].nunique()} subjects)",
                                subject_weight=cfg.subject_correction, subjects=val["subject"])
    else:
        rule = DecisionRule(band=cfg.review_band, fitted_on="none (defaults): no validation cells of both classes",
                            subject_weight=cfg.subject_correction)
    rule.save(run_dir / "calibration.json")
    log.info("decision rule: temperature %.3f, threshold %.3f, band %.2f, fitted on %s", rule.temperature,
             rule.threshold, rule.band, rule.fitted_on)
    rng = np.random.default_rng(cfg.seed)
    part = split["split"].to_numpy()

    def pick(name: str, n: int) -> np.ndarray:
        idx = np.flatnonzero(part == name)
        return np.sort(rng.choice(idx, n, replace=False)) if len(idx) > n else idx

    paths = split["path"].to_numpy()
    tr_img, tr_crop, va_img, va_crop = pick("train", max_images), pick("train", max_crops), \
        pick("val", max_images), pick("val", max_crops)
    try:
        gate = fit_gate(model, [read_image(p) for p in paths[tr_img]], np.asarray(images[rows[tr_crop]]),
                        [read_image(p) for p in paths[va_img]], np.asarray(images[rows[va_crop]]),
                        fitted_on=f"{len(tr_crop)} training cells")
    except ValueError as exc:
        log.warning("no out-of-distribution gate for this run: %s", exc)
        return
    gate.save(run_dir / "gate.json")
    log.info("out-of-distribution gate fitted; false rejection on validation cells: %s",
             json.dumps(gate.false_rejection))


def input_mean(cfg: RunConfig, images: np.ndarray, rows: np.ndarray, max_cells: int = 2000) -> np.ndarray:
    """Per-channel mean (pixels/255) of what the architecture sees: the train cells, standardised when the
    recipe standardises cells (then estimated on up to `max_cells` cells drawn with the run's seed)."""
    from core.image.preprocessing import channel_stats
    from core.image.stain import standardize_cells

    if not cfg.cell_standardize:
        return channel_stats(images, rows)[0]
    rows = np.asarray(rows)
    if len(rows) > max_cells:
        rows = np.random.default_rng(cfg.seed).choice(rows, max_cells, replace=False)
    rows = np.sort(rows)
    total, n = np.zeros(3), 0
    for s in range(0, len(rows), 256):
        block = standardize_cells(np.asarray(images[rows[s:s + 256]]))
        total += block.sum(axis=(0, 1, 2))
        n += block.shape[0] * block.shape[1] * block.shape[2]
    return (total / n / 255.0).astype("float32")


def build_model(cfg: RunConfig, mean: np.ndarray):
    """The recipe's compiled model: architecture, normalisation, augmentation and stain layers from `cfg`."""
    import keras

    from core.nets.models import create_model

    model = create_model(cfg.architecture, cfg.image_size, mean=mean,
                         augment=cfg.augment_spec() if cfg.augment else None, seed=cfg.seed,
                         init=cfg.init or "none", freeze_backbone=cfg.freeze_backbone,
                         standardize=cfg.cell_standardize, mixstyle=cfg.mixstyle, head_l1l2=cfg.head_l1l2)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def predict_rows(model, images: np.ndarray, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Probability of `all` for cache rows, in the given order."""
    from training.data import CacheBatches

    probs = model.predict(CacheBatches(images, rows, None, max(batch_size, 64)), verbose=0)
    return np.asarray(probs, dtype="float64")[:, 1]


def _augmented_validation(model, images, rows, labels, cfg: RunConfig):
    """The report's validation set: `val_samples_per_class` augmented cells per class, fixed for the run."""
    import keras

    from training.data import one_hot

    aug = model.get_layer("augmentation") if cfg.augment else None
    rng = np.random.default_rng([cfg.seed, 999])
    xs, ys = [], []
    for c in (0, 1):
        pool = rows[labels == c]
        pick = rng.choice(pool, cfg.val_samples_per_class, replace=len(pool) < cfg.val_samples_per_class)
        for s in range(0, len(pick), 256):
            batch = np.asarray(images[np.sort(pick[s:s + 256])], dtype="float32")
            if aug is not None:
                batch = keras.ops.convert_to_numpy(aug(batch, training=True))
            xs.append(np.clip(batch, 0, 255).astype("uint8"))
            ys.append(np.full(len(batch), c))
    return np.concatenate(xs), one_hot(np.concatenate(ys))
