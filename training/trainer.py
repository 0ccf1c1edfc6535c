"""`train(config)`: one training job from a `RunConfig` to a completed run folder.

Data: index -> split (saved) -> crop cache -> class-balanced batches. Model: the registry, normalisation and
augmentation inside. Keras' own callbacks do the report's schedule (ReduceLROnPlateau, EarlyStopping,
ModelCheckpoint, CSVLogger); `StoreCallback` streams epochs and batch progress into the run store and turns a
stop request (SIGTERM/SIGINT or the dashboard's Cancel) into a checkpoint and a `cancelled` run.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
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
        def handler(signum, _frame):
            self.signal_name = signal.Signals(signum).name
            self.event.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)

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


def _store_callback(store: RunStore, run_id: str, run_dir: Path, stop: StopFlag, steps: int, state: dict):
    import keras

    class StoreCallback(keras.callbacks.Callback):
        """Epoch rows, throttled batch progress and heartbeats into the store; last checkpoint each epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            self.last = 0.0
            self.epoch = epoch
            store.set_progress(run_id, epoch, 0, steps)

        def on_train_batch_end(self, batch, logs=None):
            if stop:
                raise Cancelled(stop.signal_name or "stop requested")
            now = time.perf_counter()
            if now - self.last > 0.5 or batch + 1 == steps:
                store.set_progress(run_id, self.epoch, batch + 1, steps)
                self.last = now

        def on_test_begin(self, logs=None):
            store.set_progress(run_id, self.epoch, steps, steps, phase="validate")

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["learning_rate"] = lr
            seconds = time.perf_counter() - self.t0
            state.update(epoch=epoch + 1, best_val_accuracy=max(state.get("best_val_accuracy") or 0.0,
                                                                  float(logs.get("val_accuracy", 0.0))))
            _atomic_save(self.model, run_dir / "last.keras")
            _atomic_json(state, run_dir / "state.json")
            store.log_epoch(run_id, epoch, logs, seconds)
            log.info("epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.2e (%.1f s)", epoch + 1,
                     logs.get("loss", np.nan), logs.get("accuracy", np.nan), logs.get("val_loss", np.nan),
                     logs.get("val_accuracy", np.nan), lr, seconds)

    return StoreCallback()


class DeviceQueue:
    """One job at a time per run store (one GPU): an exclusive flock, released by the kernel if we die."""

    def __init__(self, store: RunStore, run_id: str, stop: StopFlag):
        self.path, self.store, self.run_id, self.stop = store.root / "device.lock", store, run_id, stop
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        waited, beat = 0.0, 0.0
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self.stop:
                    raise Cancelled("cancelled while queued")
                if waited - beat >= 10:
                    self.store.heartbeat(self.run_id)
                    beat = waited
                if waited == 0:
                    log.info("device busy with another run: queued")
                time.sleep(0.5)
                waited += 0.5
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
def prepare_data(cfg: RunConfig, run_dir: Path, reuse_split: bool):
    """Index, split (or reload the run's split), build/reuse the crop cache; returns (split, cache, rows)."""
    from core.dataset import index
    from core.preprocessing import CropCache
    from core.splits import load_split, make_split, save_split

    manifest, problems = index(cfg.data_dir)
    if len(problems):
        problems.to_csv(run_dir / "problems.csv", index=False)
        log.warning("%d files excluded by the indexer (see problems.csv)", len(problems))
    split_path = run_dir / "split.csv"
    if reuse_split and split_path.exists():
        split = load_split(split_path)
    else:
        split = make_split(manifest, cfg.split, seed=cfg.seed, val_fold=cfg.val_fold)
        save_split(split, split_path)
    if split.attrs.get("leaks_subjects"):
        log.warning("split %s: %s", cfg.split, split.attrs["note"])
    files = manifest.set_index("path").loc[split["path"], ["size", "mtime_ns"]].reset_index()
    cache = CropCache.build(files, cfg.cache_dir, size=cfg.image_size, progress=False)
    if cache.failures:
        cache.problems().to_csv(run_dir / "cache_problems.csv", index=False)
        log.warning("%d cells could not be decoded and are left out", len(cache.failures))
    rows = cache.rows(split["path"])
    keep = cache.valid[rows]
    split, rows = split[keep].reset_index(drop=True), rows[keep]
    return split, cache, rows


def train(config: RunConfig, store: RunStore | None = None, run_id: str | None = None,
          resume: bool = False, stop: StopFlag | None = None) -> str:
    """Run one job to its end and return the run id; the run's final status says how it ended."""
    store = store or RunStore(config.runs_dir)
    if resume:
        if run_id is None:
            raise ValueError("resume needs a run id")
        cfg = RunConfig.from_dict(store.get_run(run_id)["config"])
    else:
        cfg = config.resolved()
        run_id = run_id or store.create_run(cfg.to_dict())
        store.update_config(run_id, cfg.to_dict())
    run_dir = store.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    handler = _setup_logging(run_dir)
    stop = stop or StopFlag()
    stop.install()
    store.claim(run_id)
    try:
        with DeviceQueue(store, run_id, stop):
            _train(cfg, store, run_id, run_dir, resume, stop)
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
        logging.getLogger("cnmc").removeHandler(handler)
        handler.close()
    return run_id


def _train(cfg: RunConfig, store: RunStore, run_id: str, run_dir: Path, resume: bool, stop: StopFlag) -> None:
    import keras

    from core.models import load_model
    from training import hardware
    from training.data import BalancedBatches, CacheBatches

    keras.utils.set_random_seed(cfg.seed)
    acc = hardware.detect()
    policy = hardware.precision_policy(cfg.mixed_precision, acc)
    keras.mixed_precision.set_dtype_policy(policy)
    device = acc.describe(policy)
    store.start(run_id, device)
    log.info("run %s on %s; config: %s", run_id, device, json.dumps(cfg.to_dict()))

    store.set_progress(run_id, 0, 0, 0, phase="preparing data")
    split, cache, rows = prepare_data(cfg, run_dir, reuse_split=resume)
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

    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else {}
    initial_epoch = int(state.get("epoch", 0))
    with hardware.strategy_scope(cfg.devices, acc):
        if resume and (run_dir / "last.keras").exists():
            model = load_model(str(run_dir / "last.keras"), compile=True)
            log.info("resuming from epoch %d", initial_epoch)
        else:
            mean = input_mean(cfg, cache.array, train_rows)
            state["train_mean"] = mean.tolist()
            model = build_model(cfg, mean)
    train_data = BalancedBatches(cache.array, [train_rows[train_labels == c] for c in (0, 1)],
                                 cfg.samples_per_class, cfg.batch_size, seed=cfg.seed, first_epoch=initial_epoch,
                                 workers=cfg.loader_workers, use_multiprocessing=False, max_queue_size=8)
    if no_val:
        val_data = None
        log.info("split all: no validation; %d fixed epochs, the last one is kept", cfg.epochs)
    elif cfg.val_augmented:
        log.warning("validation set is augmented and class-balanced (the report's protocol): optimistic")
        val_data = _augmented_validation(model, cache.array, val_rows, val_labels, cfg)
    else:
        val_data = CacheBatches(cache.array, val_rows, val_labels, cfg.batch_size, workers=cfg.loader_workers,
                                use_multiprocessing=False, max_queue_size=8)
    callbacks = [] if no_val else [
        keras.callbacks.ReduceLROnPlateau(monitor="val_accuracy", mode="max", factor=cfg.lr_factor,
                                          patience=cfg.lr_patience, min_lr=cfg.min_lr),
        keras.callbacks.ModelCheckpoint(str(run_dir / "best.keras"), monitor="val_accuracy", mode="max",
                                        save_best_only=True,
                                        initial_value_threshold=state.get("best_val_accuracy")),
    ]
    callbacks.append(keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume))
    if cfg.early_stopping and not no_val:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                                       patience=cfg.es_patience))
    callbacks.append(_store_callback(store, run_id, run_dir, stop, len(train_data), state))
    if initial_epoch < cfg.epochs:
        model.fit(train_data, validation_data=val_data, epochs=cfg.epochs, initial_epoch=initial_epoch,
                  callbacks=callbacks, verbose=0)
    store.set_progress(run_id, cfg.epochs, 0, 0, phase="predicting")
    best = run_dir / "best.keras"
    if no_val:
        _atomic_save(model, best)
    final = load_model(str(best)) if best.exists() else model
    held_out = np.isin(part, ["val", "test"])
    out = split[["path", "subject", "label", "split"]][held_out].copy()
    out["prob_all"] = predict_rows(final, cache.array, rows[held_out], cfg.batch_size) if held_out.any() else []
    out.to_csv(run_dir / "predictions.csv", index=False)
    store.set_progress(run_id, cfg.epochs, 0, 0, phase="calibrating")
    fit_rule_and_gate(cfg, final, split, cache.array, rows, out, run_dir)
    test = out[out["split"] == "test"]
    summary = {"test_cells": int(len(test)), "best_val_accuracy": state.get("best_val_accuracy"),
               "split": cfg.split, "data_dir": str(cfg.data_dir), "device": store.get_run(run_id)["device"]}
    if len(test):
        summary["test_accuracy"] = float(((test["prob_all"] >= 0.5) == (test["label"] == "all")).mean())
    _atomic_json(summary, run_dir / "summary.json")
    log.info("finished: %s", json.dumps(summary))
    store.finish(run_id, "completed")


def fit_rule_and_gate(cfg: RunConfig, model, split, images: np.ndarray, rows: np.ndarray, preds,
                      run_dir: Path, max_images: int = 400, max_crops: int = 2000) -> None:
    """Every run ends with its decision rule (temperature, threshold, review band: `calibration.json`) and its
    out-of-distribution gate (`gate.json`), fitted on its own validation split, so no model is ever used
    without them. Without validation cells (split `all`) the rule keeps its defaults and says so."""
    from core.calibration import DecisionRule
    from core.gate import fit_gate
    from core.imageio import read_image

    val = preds[preds["split"] == "val"]
    yv = (val["label"] == "all").to_numpy().astype(int)
    if len(np.unique(yv)) == 2:
        rule = DecisionRule.fit(yv, val["prob_all"].to_numpy(), cfg.target_sensitivity, cfg.review_band,
                                fitted_on=f"validation split ({len(val)} cells, {val['subject'].nunique()} subjects)")
    else:
        rule = DecisionRule(band=cfg.review_band, fitted_on="none (defaults): no validation cells of both classes")
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
    from core.preprocessing import channel_stats
    from core.stain import standardize_cells

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

    from core.models import create_model

    model = create_model(cfg.architecture, cfg.image_size, mean=mean,
                         augment=cfg.augment_spec() if cfg.augment else None, seed=cfg.seed,
                         weights=cfg.weights, standardize=cfg.cell_standardize)
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
