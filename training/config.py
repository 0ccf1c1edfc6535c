"""`RunConfig`: the one place where training settings and their defaults live (the report's values).

The CLI flags and the dashboard's Train form are generated from these fields; the resolved config is written
as `config.json` into every run folder, so a run can be reproduced from its folder alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.data.atomic import atomic_path


def _f(default, help: str, choices: tuple | None = None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices}, **kw)


@dataclass
class RunConfig:
    # --- what to train
    name: str = _f("", "free-text run name shown in the dashboard")
    architecture: str = _f("solution_a", "registered model: solution_a, efficientnet_b2, vgg16")
    init: str | None = _f(None, "where the weights start: none (random, the report's from-scratch), imagenet "
                                "(efficientnet_b2 / vgg16: Keras' weights, downloaded once into its cache; "
                                "efficientnet_lite0: shipped with the project, offline), or a weights file "
                                "(.weights.h5 of the same architecture and size); default per architecture "
                                "(imagenet for efficientnet_lite0, none otherwise)")
    freeze_backbone: bool = _f(False, "train the dense head only, on a frozen (ImageNet) backbone; "
                                      "efficientnet_b2, vgg16, efficientnet_lite0")
    # --- data
    data_dir: str = _f("data/demo", "C-NMC folder (any supported layout, any level)")
    cache_dir: str = _f("cache", "where decoded crop caches live")
    label_overrides: str | None = _f(None, "CSV of corrected labels (name,label), e.g. the reviewers' export: "
                                           "applied before the split; the run counts and marks them")
    split: str = _f("patient", "patient (subject-disjoint, default), official (challenge folds), image (leaky), "
                               "all (every cell trains; fixed epochs, no validation: for a final model)",
                    choices=("patient", "official", "image", "all"))
    val_fold: int = _f(2, "official split: which training fold validates")
    image_size: int = _f(250, "model input in pixels after the 100-px crop (250 = no resize)")
    crop_margin: int = _f(100, "pixels cut from each side of a 450-px tile before resizing (scaled with the "
                               "image: 100/450 of the side); 0 keeps whole images, for tightly pre-cropped "
                               "datasets such as ALL-IDB2")
    # --- optimisation (report §5.4-5.5)
    batch_size: int | None = _f(None, "batch size; default per architecture (solution_a 16, efficientnet_b2 32)")
    epochs: int | None = _f(None, "epochs; default per architecture (solution_a 50, efficientnet_b2 30)")
    learning_rate: float = _f(1e-4, "Adam learning rate")
    lr_factor: float = _f(0.5, "ReduceLROnPlateau factor (monitor: validation accuracy)")
    lr_patience: int = _f(2, "ReduceLROnPlateau patience in epochs")
    min_lr: float = _f(1e-6, "ReduceLROnPlateau floor")
    early_stopping: bool = _f(True, "stop when validation accuracy stalls (the report gained 2 points without)")
    es_patience: int = _f(6, "EarlyStopping patience in epochs")
    # --- class balance and augmentation (report §5.2)
    samples_per_class: int = _f(10_000, "cells drawn per class per epoch (class-balanced, augmented on the fly)")
    augment: bool = _f(True, "random rotation + flip, then 1/3 each: nothing, shear or Gaussian blur")
    rotation_min_deg: float = _f(0.0, "lower bound of the random rotation angle (de Oliveira: 20)")
    rotation_max_deg: float = _f(360.0, "upper bound of the random rotation angle (de Oliveira: 340)")
    shear: float = _f(0.2, "shear factor of the shear branch")
    blur_sigma_max: float = _f(1.5, "largest Gaussian blur sigma of the blur branch (pixels)")
    salt_pepper: float = _f(0.0, "salt-and-pepper noise rate (de Oliveira's option; 0 = off)")
    head_l1l2: float | None = _f(None, "L1 and L2 factor on the dense head's kernels; none = the architecture's "
                                       "own (solution_a 7e-4 each, the report's; others L1 1e-5, L2 1e-4)")
    # --- generalisation across patients (stain and colour differ by subject; chosen by benchmarks/bench_real.py)
    cell_standardize: bool = _f(True, "standardise each cell's colours (per-channel mean/std of the cell; part of "
                                      "the model, so also at inference)")
    hed_sigma: float = _f(0.05, "HED stain jitter (Tellez 2019): per stain alpha~U(1-s,1+s), beta~U(-s,s); 0 = off")
    brightness: float = _f(0.1, "brightness jitter: factor ~U(1-f, 1+f) on the cell; 0 = off")
    contrast: float = _f(0.1, "contrast jitter around the cell's mean: factor ~U(1-f, 1+f); 0 = off")
    saturation: float = _f(0.1, "saturation jitter: factor ~U(1-f, 1+f); 0 = off")
    hue: float = _f(0.02, "hue jitter: rotation ~U(-h, h) turns about the grey axis; 0 = off")
    sharpness: float = _f(1.0, "texture jitter: unsharp-mask amount ~U(-s, s) (blur or sharpen the cell); 0 = off")
    noise_std: float = _f(8.0, "texture jitter: Gaussian noise on the cell, std ~U(0, n) grey levels; 0 = off")
    mixstyle: float = _f(0.0, "MixStyle (Zhou et al. 2021): per batch with this probability, mix the early "
                              "feature statistics (channel means/stds, the cells' 'style') of random cell pairs, "
                              "training only; solution_a; 0 = off")
    subject_correction: float = _f(0.0, "per-subject correction of calls (Pan et al. 2019, the C-NMC winner): "
                                        "each cell's logit blended with this weight with the mean logit of the "
                                        "same subject's other cells, where names carry subject ids (UID_...); "
                                        "assumes a subject's cells share one class, as in C-NMC but not in a "
                                        "real patient's blood; kept in the decision rule; 0 = off")
    # --- safe classification (fitted on the validation split at the end of every run)
    target_sensitivity: float | None = _f(None, "decision threshold reaching this sensitivity for all on "
                                                "validation (none = 0.5 on the calibrated probability)")
    review_band: float = _f(0.1, "cells whose calibrated P(blast) is within this of the threshold: review manually")
    val_augmented: bool = _f(False, "the report's augmented, class-balanced validation set (optimistic)")
    val_samples_per_class: int = _f(2_000, "cells per class of the augmented validation set")
    # --- hardware
    mixed_precision: str = _f("auto", "auto (on for GPUs with tensor cores), on, off", choices=("auto", "on", "off"))
    devices: str = _f("one", "one (first GPU or CPU), local (all local GPUs), multiworker (TF_CONFIG; "
                                 "TensorFlow or JAX backend)",
                      choices=("one", "local", "multiworker"))
    loader_workers: int = _f(2, "threads slicing batches from the crop cache")
    # --- bookkeeping
    tensorboard: bool = _f(True, "write TensorBoard logs (scalars, learning rate, augmented sample cells) to the "
                                 "run folder's tensorboard/; view with `tensorboard --logdir RUN/tensorboard`")
    seed: int = _f(0, "seed for splits, sampling, augmentation and initialisation")
    runs_dir: str = _f("runs", "run store: SQLite database + one folder per run")

    # Derived -------------------------------------------------------------------------------------------
    def resolved(self) -> "RunConfig":
        """Copy with per-architecture defaults filled in from the model registry, validated."""
        from core.nets.models import check_mixstyle, model_info

        info = model_info(self.architecture)
        if self.mixstyle > 0:
            check_mixstyle(self.architecture)
        init = self.init or ("imagenet" if info.imagenet == "wheel" else "none")
        cfg = dataclasses.replace(self, batch_size=self.batch_size or info.batch_size,
                                  epochs=self.epochs or info.epochs, init=init)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        if not 0 <= self.crop_margin < 225:
            raise ValueError("crop_margin must be in [0, 225) pixels of a 450-px tile")
        if self.init not in (None, "none", "imagenet") and not Path(self.init).is_file():
            raise ValueError(f"init must be none, imagenet or an existing weights file; no file at {self.init!r}")
        if self.freeze_backbone:
            from core.nets.models import builder_options, list_models

            if "freeze_backbone" not in builder_options(self.architecture):
                able = [n for n in list_models() if "freeze_backbone" in builder_options(n)]
                raise ValueError(f"freeze_backbone: {self.architecture} has no separate backbone "
                                 f"(those that do: {', '.join(able)})")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16 pixels")
        if self.target_sensitivity is not None and not 0 < self.target_sensitivity <= 1:
            raise ValueError("target_sensitivity must be in (0, 1]")
        if self.head_l1l2 is not None and self.head_l1l2 < 0:
            raise ValueError("head_l1l2 must be >= 0")
        if not 0 <= self.mixstyle <= 1:
            raise ValueError("mixstyle must be in [0, 1]")
        if not 0 <= self.subject_correction <= 1:
            raise ValueError("subject_correction must be in [0, 1]")
        if not 0 <= self.review_band < 0.5:
            raise ValueError("review_band must be in [0, 0.5)")
        if not 0 <= self.rotation_min_deg <= self.rotation_max_deg <= 360:
            raise ValueError("rotation range must satisfy 0 <= min <= max <= 360")
        for name in ("batch_size", "epochs", "samples_per_class"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be positive")

    def augment_spec(self):
        from core.nets.augmentation import AugmentSpec

        return AugmentSpec(rotation_deg=(self.rotation_min_deg, self.rotation_max_deg), flip=True,
                           shear=self.shear, blur_sigma=(min(0.5, self.blur_sigma_max), self.blur_sigma_max),
                           salt_pepper=self.salt_pepper, hed_sigma=self.hed_sigma, brightness=self.brightness,
                           contrast=self.contrast, saturation=self.saturation, hue=self.hue,
                           sharpness=self.sharpness, noise_std=self.noise_std)

    # Serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        if "weights" in data and "init" not in data:  # configs written before `init` replaced `weights`
            data = {k: v for k, v in data.items() if k != "weights"} | {"init": data["weights"] or None}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())


# Named presets: field overrides of the defaults, each with one line on what it is and when to use it (CLI
# `run --preset NAME`, the Train page's picker). The first five are whole runs; the `cross_patient*` and
# `report` recipes change only the augmentation and stain handling (benchmarks/bench_real.py compares them):
# `report` is the report's recipe as published (raw colours, geometric augmentation only); `cross_patient`
# adds cell standardisation and stain/colour jitter; the defaults above are `cross_patient_texture` (that plus
# texture jitter), the best of the three on unseen patients of fold 1; `cross_patient_mixstyle` adds MixStyle,
# `cross_patient_light_head` a 70x lighter L1/L2 penalty on the dense head.
_REPORT_RECIPE = {"cell_standardize": False, "hed_sigma": 0.0, "brightness": 0.0, "contrast": 0.0,
                  "saturation": 0.0, "hue": 0.0, "sharpness": 0.0, "noise_std": 0.0}
PRESETS: dict[str, dict[str, Any]] = {
    "quick_demo": {"architecture": "solution_a", "image_size": 64, "batch_size": 32, "epochs": 3,
                   "samples_per_class": 256, "learning_rate": 1e-3, "early_stopping": False},
    "starter": {"architecture": "solution_a", "image_size": 64, "batch_size": 32, "epochs": 6,
                "samples_per_class": 1000, "learning_rate": 5e-4, "early_stopping": False},
    "report_solution_a": {**_REPORT_RECIPE, "architecture": "solution_a"},
    "report_solution_b": {**_REPORT_RECIPE, "architecture": "efficientnet_b2", "init": "none"},
    "challenge": {**_REPORT_RECIPE, "architecture": "efficientnet_b2", "image_size": 250, "init": "imagenet",
                  "split": "official", "mixed_precision": "auto"},
    "cross_patient_texture": {},
    "cross_patient": {"sharpness": 0.0, "noise_std": 0.0},
    "cross_patient_mixstyle": {"mixstyle": 0.5},
    "cross_patient_light_head": {"head_l1l2": 1e-5},
    "report": dict(_REPORT_RECIPE),
}
RUN_PRESETS = tuple(PRESETS)[:5]  # the whole runs, in the order the Train page offers them
PRESET_NOTES: dict[str, str] = {
    "quick_demo": "Solution A at 64 px, 3 short epochs: about a minute on a laptop CPU; to see the whole loop work",
    "starter": "the shipped starter model's recipe (Solution A at 64 px, stain/colour/texture jitter, 6 epochs "
               "of 1,000 cells per class): minutes on a CPU; a sound first model of your own cells",
    "report_solution_a": "the report's custom CNN at 250 px with its published augmentation, 50 epochs of 10,000 "
                         "cells per class: hours on a CPU, use a GPU",
    "report_solution_b": "the report's EfficientNetB2 at 250 px from scratch (its Solution B): a GPU job",
    "challenge": "the C-NMC challenge protocol for users with the full data: official training folds for training "
                 "and validation, the labelled preliminary test set as test, EfficientNetB2 at 250 px from "
                 "ImageNet (Keras' weights, downloaded once; --init none without them), mixed precision on a GPU; "
                 "prints the test weighted F1 with subject-bootstrap CIs and writes the HTML report",
    "cross_patient_texture": "the project's default recipe (cell standardisation, stain, colour and texture "
                             "jitter) with the default architecture and budget",
    "cross_patient": "the default recipe without texture jitter",
    "cross_patient_mixstyle": "the default recipe plus MixStyle (Solution A only)",
    "cross_patient_light_head": "the default recipe with a 70x lighter L1/L2 penalty on the dense head",
    "report": "the report's augmentation recipe (raw colours, geometric augmentation only) on the default "
              "architecture and budget",
}


def preset(recipe: str, **overrides) -> RunConfig:
    """A `RunConfig` of a named preset (see `PRESETS`, `PRESET_NOTES`), with field overrides."""
    if recipe not in PRESETS:
        raise ValueError(f"unknown preset {recipe!r}; choose one of {', '.join(PRESETS)}")
    return RunConfig(**{**PRESETS[recipe], **overrides})


def field_help() -> dict[str, str]:
    """Field name -> help text, for forms that describe each setting."""
    return {f.name: f.metadata.get("help", "") for f in fields(RunConfig)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per RunConfig field, typed and documented from the dataclass itself."""
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in typ:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{f.metadata['help']} (default {default})")
            continue
        conv = int if typ.startswith("int") else float if typ.startswith("float") else str
        parser.add_argument(flag, dest=f.name, type=conv, default=None, choices=f.metadata.get("choices"),
                            help=f"{f.metadata['help']} (default {default})")


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """A config from `base` (or defaults) overridden by the flags that were given."""
    cfg = base or RunConfig()
    changes = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}
    return dataclasses.replace(cfg, **changes)
