"""`train(config)`: one training job from a `RunConfig` to a completed run folder.

Data: index -> split (saved) -> crop cache -> class-balanced batches. Model: the registry, normalisation and
augmentation inside. Keras' own callbacks do the report's schedule (ReduceLROnPlateau, EarlyStopping, CSVLogger);
`training.checkpoint.Checkpointer` streams epochs and batch progress into the run store, writes the checkpoints a
resume continues from, and turns a stop request (SIGTERM/SIGINT or the dashboard's Cancel: `training.worker`)
into a checkpoint and a `cancelled` run. `_train` is the recipe; each of its steps is a function below it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.data.atomic import atomic_path, atomic_write_text
from training.checkpoint import Checkpointer, check_steps, read_state, restore_point, rewind, save_model
from training.config import RunConfig
from training.store import RunStore
from training.worker import Cancelled, DeviceQueue, Heartbeat, StopFlag, device_key

if TYPE_CHECKING:
    import keras
    import pandas as pd

    from core.image.preprocessing import CropCache
    from training.data import BalancedBatches, CacheBatches
    from training.hardware import Accelerators

log = logging.getLogger("cnmc.trainer")


# --- the job's life: settings, run store, signals, device ---------------------------------------------------------
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
    """The job in its run folder and the store: claimed, beating and queued for its device, then trained; however
    it ends (completed, cancelled, failed) is recorded."""
    cfg, run_id = _job_config(config, store, run_id, resume, epochs)
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


def _job_config(config: RunConfig, store: RunStore, run_id: str | None, resume: bool,
                epochs: int | None) -> tuple[RunConfig, str]:
    """The settings the job runs with, and its run id: a resumed run's own (`epochs` the one change, never below
    what it has trained), or `config` resolved for a new run, registered here unless its launcher did."""
    if resume:
        if run_id is None:
            raise ValueError("resume needs a run id")
        cfg = RunConfig.from_dict(store.get_run(run_id)["config"])
        if epochs is not None and epochs != cfg.epochs:
            done = read_state(store.run_dir(run_id)).get("epoch", 0)
            if epochs < done:
                raise ValueError(f"run {run_id} has already trained {done} epochs; --epochs {epochs} would undo them")
            cfg = dataclasses.replace(cfg, epochs=int(epochs))
            store.update_config(run_id, cfg.to_dict())
        return cfg, run_id
    cfg = config.resolved()
    if run_id is None:  # a start that cannot be had fails here, before any run is registered or folder made
        from core.nets.models import ensure_init

        ensure_init(cfg.architecture, cfg.init)
    run_id = run_id or store.create_run(cfg.to_dict())
    store.update_config(run_id, cfg.to_dict())
    return cfg, run_id


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


# --- the recipe ---------------------------------------------------------------------------------------------------
def _train(cfg: RunConfig, store: RunStore, run_id: str, run_dir: Path, resume: bool, stop: StopFlag,
           acc: Accelerators) -> None:
    """One job on the device it holds. A requested stop ends it (`Cancelled`) between steps or after a batch."""
    job = _Job(cfg, store, run_id, run_dir, stop, acc)
    _start_on_device(job)
    job.cells = _load_cells(job, resume)
    state, checkpoint = restore_point(run_dir, resume)
    if resume:
        rewind(store, run_id, run_dir, state, cfg.epochs)
    model = _restore_or_build_model(job, state, checkpoint)
    steps = job.batches(0, 1).steps
    check_steps(state, steps)
    val_data = _validation_data(job, model)
    callbacks = _schedule_callbacks(job, model, resume)
    keeper = Checkpointer(model, store, run_id, run_dir, stop, steps, cfg.epochs, state, list(callbacks),
                          keep_best=not job.no_val)
    callbacks.append(keeper.callback())  # last: it restores the others' counters after they reset themselves
    _fit(job, model, val_data, callbacks, keeper, state, steps)
    stop.check("after training")
    final = _final_model(job, model)
    out = _predict_held_out(job, final)
    store.set_progress(run_id, cfg.epochs, 0, 0, phase="calibrating")
    fit_rule_and_gate(cfg, final, job.cells.split, job.cells.cache.array, job.cells.rows, out, run_dir)
    _write_summary(job, state, out)
    store.finish(run_id, "completed")


@dataclasses.dataclass
class _Cells:
    """The run's cells: the split table, the crop cache and each table row's cache row."""
    split: pd.DataFrame
    cache: CropCache
    rows: np.ndarray

    def __post_init__(self) -> None:
        self.labels = (self.split["label"] == "all").to_numpy().astype(int)
        self.part = self.split["split"].to_numpy()

    def of(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Cache rows and labels (1 = all) of one part of the split (train, val, test)."""
        return self.rows[self.part == part], self.labels[self.part == part]


@dataclasses.dataclass
class _Job:
    """What the steps of one training job share."""
    cfg: RunConfig
    store: RunStore
    run_id: str
    run_dir: Path
    stop: StopFlag
    acc: Accelerators
    shard: tuple[int, int] = (0, 1)  # (index, count): this process's slice of every batch (JAX multi-process)
    cells: _Cells | None = None

    @property
    def no_val(self) -> bool:
        """Split `all`: a final model, fixed epochs, the last one kept, no validation."""
        return self.cfg.split == "all"

    @property
    def loader(self) -> dict:
        """Keras' loader settings for every batch sequence: `loader_workers` threads, a short queue."""
        return dict(workers=self.cfg.loader_workers, use_multiprocessing=False, max_queue_size=8)

    def batches(self, first_epoch: int, epochs: int, skip: int = 0) -> BalancedBatches:
        """The training batches of `epochs` epochs from `first_epoch`, less the `skip` already trained."""
        from training.data import BalancedBatches

        cfg = self.cfg
        rows, labels = self.cells.of("train")
        pools = [rows[labels == c] for c in (0, 1)]
        return BalancedBatches(self.cells.cache.array, pools, cfg.samples_per_class, cfg.batch_size, seed=cfg.seed,
                               first_epoch=first_epoch, epochs=epochs, skip=skip, shard=self.shard, **self.loader)


def _start_on_device(job: _Job) -> None:
    """Seed, precision policy and this process's data shard; the run is `running` from here, its device named."""
    import keras

    from training import hardware

    cfg = job.cfg
    keras.utils.set_random_seed(cfg.seed)
    policy = hardware.precision_policy(cfg.mixed_precision, job.acc)
    keras.mixed_precision.set_dtype_policy(policy)
    device = job.acc.describe(policy)
    device += hardware.describe_workers(cfg.devices)
    job.shard = hardware.data_shard(cfg.devices)  # (0, 1) but under JAX multi-process: this process's slice
    if job.shard[1] > 1:
        log.info("process %d of %d feeds %d of every %d cells of a batch", job.shard[0], job.shard[1],
                 cfg.batch_size // job.shard[1], cfg.batch_size)
    job.store.start(job.run_id, device)
    log.info("run %s on %s; config: %s", job.run_id, device, json.dumps(cfg.to_dict()))


def _load_cells(job: _Job, resume: bool) -> _Cells:
    """The split (a resumed run's own) and the crop cache; refused without validation cells unless split `all`."""
    job.store.set_progress(job.run_id, 0, 0, 0, phase="preparing data")
    cells = _Cells(*prepare_data(job.cfg, job.run_dir, reuse_split=resume))
    job.stop.check("while preparing data")
    if len(cells.of("val")[0]) == 0 and not job.no_val:
        raise ValueError("the validation split is empty")
    log.info("cells: train %d, val %d, test %d (split %s)", len(cells.of("train")[0]), len(cells.of("val")[0]),
             int((cells.part == "test").sum()), job.cfg.split)
    return cells


def _restore_or_build_model(job: _Job, state: dict, checkpoint: Path) -> keras.Model:
    """The checkpoint's model (weights and optimizer) when there is a state to continue, else a new one normalised
    by the training cells' mean (kept in the state)."""
    from core.nets.models import load_model
    from training import hardware

    cfg = job.cfg
    with hardware.strategy_scope(cfg.devices, job.acc):
        if state:
            model = load_model(str(checkpoint), compile=True)
            log.info("resuming at epoch %d, step %d of its %s", int(state.get("epoch", 0)) + 1,
                     int(state.get("step", 0)) + 1, state.get("steps_per_epoch"))
        else:
            mean = input_mean(cfg, job.cells.cache.array, job.cells.of("train")[0])
            state["train_mean"] = mean.tolist()
            model = build_model(cfg, mean)
    if cfg.devices == "multiworker" and job.acc.backend == "tensorflow":
        hardware.fix_multiworker_build(model)
    return model


def _validation_data(job: _Job, model: keras.Model) -> CacheBatches | tuple[np.ndarray, np.ndarray] | None:
    """The validation split's cells as they are (the default), the report's augmented set, or none (split all)."""
    from training.data import CacheBatches

    cfg = job.cfg
    val_rows, val_labels = job.cells.of("val")
    if job.no_val:
        log.info("split all: no validation; %d fixed epochs, the last one is kept", cfg.epochs)
        return None
    if cfg.val_augmented and job.shard[1] > 1:
        raise ValueError("val_augmented is not supported in JAX multi-process training: validate on the "
                         "validation split's cells (the default)")
    if cfg.val_augmented:
        log.warning("validation set is augmented and class-balanced (the report's protocol): optimistic")
        return _augmented_validation(model, job.cells.cache.array, val_rows, val_labels, cfg)
    return CacheBatches(job.cells.cache.array, val_rows, val_labels, cfg.batch_size, shard=job.shard, **job.loader)


def _schedule_callbacks(job: _Job, model: keras.Model, resume: bool) -> list:
    """The report's schedule as Keras' own callbacks (learning rate on plateau, early stopping), the history
    (appended to on a resume) and TensorBoard logs where they can be written."""
    import keras

    cfg, run_dir = job.cfg, job.run_dir
    callbacks = [] if job.no_val else [
        keras.callbacks.ReduceLROnPlateau(monitor="val_accuracy", mode="max", factor=cfg.lr_factor,
                                          patience=cfg.lr_patience, min_lr=cfg.min_lr)]
    callbacks.append(keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume))
    if cfg.early_stopping and not job.no_val:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                                       patience=cfg.es_patience))
    if cfg.tensorboard and importlib.util.find_spec("tensorflow") is None:
        log.warning("run %s: no TensorBoard logs: Keras writes them with TensorFlow's summary ops, and TensorFlow "
                    "is not installed here (backend %s)", job.run_id, keras.backend.backend())
    elif cfg.tensorboard:
        callbacks.append(_tensorboard(cfg, model, job.cells.cache.array, job.cells.of("train")[0], run_dir))
    return callbacks


def _fit(job: _Job, model: keras.Model, val_data: object, callbacks: list, keeper: Checkpointer, state: dict,
         steps: int) -> None:
    """An interrupted epoch finished from the batch after the stop, then the remaining epochs (none once early
    stopping has ended the run)."""
    epochs = job.cfg.epochs
    initial_epoch, skip = int(state.get("epoch", 0)), int(state.get("step", 0))
    if skip and initial_epoch < epochs:
        keeper.resume_mid_epoch(skip, state.get("metrics"))
        model.fit(job.batches(initial_epoch, 1, skip), validation_data=val_data, epochs=initial_epoch + 1,
                  initial_epoch=initial_epoch, steps_per_epoch=steps - skip, callbacks=callbacks, verbose=0)
        initial_epoch += 1
    if initial_epoch < epochs and not state.get("stopped_early"):
        model.fit(job.batches(initial_epoch, epochs - initial_epoch), validation_data=val_data, epochs=epochs,
                  initial_epoch=initial_epoch, steps_per_epoch=steps, callbacks=callbacks, verbose=0)


def _final_model(job: _Job, model: keras.Model) -> keras.Model:
    """The model the run keeps: `best.keras` (best validation accuracy; the last epoch's for split all), on this
    process's own device under JAX multi-process (predictions, rule and gate are every process's own)."""
    import keras

    from core.nets.models import load_model

    job.store.set_progress(job.run_id, job.cfg.epochs, 0, 0, phase="predicting")
    best = job.run_dir / "best.keras"
    if job.no_val:
        save_model(model, best)
    if job.shard[1] > 1:
        keras.distribution.set_distribution(None)
    return load_model(str(best)) if best.exists() else model


def _predict_held_out(job: _Job, model: keras.Model) -> pd.DataFrame:
    """`predictions.csv`: the probability of `all` for every validation and test cell."""
    cells = job.cells
    held_out = np.isin(cells.part, ["val", "test"])
    out = cells.split[["path", "subject", "label", "split"]][held_out].copy()
    out["prob_all"] = predict_rows(model, cells.cache.array, cells.rows[held_out], job.cfg.batch_size) \
        if held_out.any() else []
    with atomic_path(job.run_dir / "predictions.csv") as tmp:
        out.to_csv(tmp, index=False)
    return out


def _write_summary(job: _Job, state: dict, out: pd.DataFrame) -> None:
    """`summary.json`: what the run trained on and how, and its test accuracy where it has test cells."""
    cfg, split = job.cfg, job.cells.split
    test = out[out["split"] == "test"]
    summary = {"test_cells": int(len(test)), "best_val_accuracy": state.get("best_val_accuracy"),
               "split": cfg.split, "data_dir": str(cfg.data_dir), "device": job.store.get_run(job.run_id)["device"],
               "epochs_trained": int(state.get("epoch", 0)),
               "labels_overridden": int(split["label_overridden"].sum()) if "label_overridden" in split else 0,
               "batches_trained": int(sum(end - first for _, first, end in state.get("ledger", [])))}
    if len(test):
        summary["test_accuracy"] = float(((test["prob_all"] >= 0.5) == (test["label"] == "all")).mean())
    atomic_write_text(job.run_dir / "summary.json", json.dumps(summary, indent=2))
    log.info("finished: %s", json.dumps(summary))


# --- data ---------------------------------------------------------------------------------------------------------
def _log_split(split: pd.DataFrame, cfg: RunConfig) -> None:
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


def prepare_data(cfg: RunConfig, run_dir: Path,
                 reuse_split: bool) -> tuple[pd.DataFrame, CropCache, np.ndarray]:
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


# --- model, callbacks, rule and gate ------------------------------------------------------------------------------
def _tensorboard(cfg: RunConfig, model: keras.Model, images: np.ndarray, rows: np.ndarray, run_dir: Path,
                 n: int = 8) -> keras.callbacks.TensorBoard:
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


def fit_rule_and_gate(cfg: RunConfig, model: keras.Model, split: pd.DataFrame, images: np.ndarray, rows: np.ndarray,
                      preds: pd.DataFrame, run_dir: Path, max_images: int = 400, max_crops: int = 2000) -> None:
    """Every run ends with its decision rule (temperature, threshold, review band: `calibration.json`) and its
    out-of-distribution gate (`gate.json`), fitted on its own validation split, so no model is ever used
    without them. Without validation cells (split `all`) the rule keeps its defaults and says so."""
    _fit_rule(cfg, preds, run_dir)
    _fit_gate(cfg, model, split, images, rows, run_dir, max_images, max_crops)


def _fit_rule(cfg: RunConfig, preds: pd.DataFrame, run_dir: Path) -> None:
    """`calibration.json` from the validation predictions (defaults when they lack a class)."""
    from core.decide.calibration import DecisionRule

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


def _fit_gate(cfg: RunConfig, model: keras.Model, split: pd.DataFrame, images: np.ndarray, rows: np.ndarray,
              run_dir: Path, max_images: int, max_crops: int) -> None:
    """`gate.json` from up to `max_images` photos and `max_crops` cells of the training and validation splits
    (drawn with the run's seed); none, said in the log, where it cannot be fitted."""
    from core.data.imageio import read_image
    from core.decide.gate import fit_gate

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


def build_model(cfg: RunConfig, mean: np.ndarray) -> keras.Model:
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


def predict_rows(model: keras.Model, images: np.ndarray, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Probability of `all` for cache rows, in the given order."""
    from training.data import CacheBatches

    probs = model.predict(CacheBatches(images, rows, None, max(batch_size, 64)), verbose=0)
    return np.asarray(probs, dtype="float64")[:, 1]


def _augmented_validation(model: keras.Model, images: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                          cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
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
