"""Package a shipped single-cell model (the starter): train, calibrate and write its model folder and card from a
`bench_real.py` result (re-runnable by anyone with the data). A product feature: `python -m training package`.

    python benchmarks/bench_real.py data/real --out runs/bench_real/main      # measure first (about 1 h)
    python -m training package data/real --bench runs/bench_real/main --recipe cross_patient_texture

1. Trains the recipe on every cell of DATA (split `all`: fixed epochs, the last kept) with the very budget the
   benchmark measured (read from its results.json), as an ordinary run in the run store; one run per seed the
   benchmark ensembled (`bench_real.py --seeds N`), shipped together as the members of one model folder.
2. Fits the decision rule (temperature, threshold 0.5 or --target-sensitivity, review band) on the benchmark's
   out-of-fold predictions of that recipe: probabilities for patients the fold models never saw.
3. Writes `models/starter/` (or --out): inference-only model.keras, decision_rule.json, card.json and card.md
   with the independent check on new patients (--independent-check FILE; "not yet run" without it), the data,
   recipe, leave-subjects-out figures with CIs, calibration and known limits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import keras

    from core.decide.calibration import DecisionRule
    from core.decide.gate import Gate
    from training.config import RunConfig
    from training.store import RunStore

CITATION = ("Gupta A., Gupta R. (eds.), ISBI 2019 C-NMC Challenge: Classification in Cancer Cell Imaging, "
            "Springer 2019; data: C-NMC 2019, The Cancer Imaging Archive (TCIA)")


# --- the card as markdown (card.md): one function per section, all read from card.json ----------------------------
def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def card_markdown(card: dict) -> str:
    """The model card (card.md) written from the card dict alone, so card.json and card.md never disagree: what it
    is, the independent check on new patients (before any cross-validated figure), then data, recipe,
    leave-subjects-out figures, decision rule, gate, known limits and the commands that remake it."""
    from core.decide.model_folder import independent_check_section

    return "\n".join([*_md_title(card), independent_check_section(card), "", *_md_data(card), *_md_recipe(card),
                      *_md_cross_validation(card), *_md_decision_rule(card), *_md_gate(card), *_md_known_limits(),
                      *_md_reproduce(card)])


def _md_title(card: dict) -> list[str]:
    return [
        f"# Model card: {card['name']}",
        "",
        "**Research use only. Not a diagnostic device.** It classifies one segmented white cell on a black "
        "background, as in C-NMC 2019, into `all` (leukemic B-lymphoblast) or `hem` (normal).",
        "",
    ]


def _md_data(card: dict) -> list[str]:
    d = card["data"]
    return [
        "## Data",
        f"- {d['description']}: {d['cells']} cells ({d['cells_by_class']['all']} all, {d['cells_by_class']['hem']} hem) "
        f"from {d['subjects']} subjects ({len(d['subjects_by_class']['all'])} ALL patients: "
        f"{', '.join(d['subjects_by_class']['all'])}; {len(d['subjects_by_class']['hem'])} healthy donors: "
        f"{', '.join(d['subjects_by_class']['hem'])}); {d['excluded']} files excluded by the indexer "
        "(duplicate content).",
        f"- Citation: {card['citation']}.",
        "",
    ]


def _md_recipe(card: dict) -> list[str]:
    r = card["recipe"]
    runs = card["training_run"] if isinstance(card["training_run"], list) else [card["training_run"]]
    return [
        "## Recipe",
        f"- `{r['preset']}` preset: {r['architecture']} from scratch at {r['image_size']} px (the 100-px margin "
        f"crop of each 450 px cell, resized), per-cell colour standardisation {'on' if r['cell_standardize'] else 'off'}, "
        f"HED stain jitter sigma {r['hed_sigma']}, brightness/contrast/saturation jitter "
        f"{r['brightness']}/{r['contrast']}/{r['saturation']}, hue {r['hue']}, texture jitter (unsharp amount "
        f"±{r.get('sharpness', 0)}, cell noise up to {r.get('noise_std', 0)} grey levels), rotation + flips + shear/blur; "
        f"Adam {r['learning_rate']}, batch {r['batch_size']}, {r['epochs']} epoch{'s' if r['epochs'] != 1 else ''} of {r['samples_per_class']} "
        "class-balanced cells per class; every cell trains (no validation split; the quality below was measured by "
        "cross-validation with the same recipe and budget).",
        (f"- An ensemble of {len(card['members'])} networks: "
         + ", ".join(f"`{m['recipe']}` seed {m['seed']}" for m in card["members"])
         + " (`report`: the report's recipe, raw colours and geometric augmentation only, the budget below); P(all) "
         "is the mean of theirs (model.keras, member-N.keras). The recipe described here is the first member's."
         if len(card.get("members", [])) > 1 else ""),
        f"- Training run{'s' if isinstance(card['training_run'], list) else ''} "
        f"{', '.join(f'`{t}`' for t in runs)}"
        + (f" (weights stored as {card['weights']['quantized']}: {card['weights']['layers']}; what that costs is "
           f"measured by {card['weights']['measured_by']})" if card.get("weights", {}).get("quantized") else "")
        + f"; input: raw RGB crops 0-255 of {r['image_size']} px; output: "
        "P(hem), P(all). Inference-only file: no optimizer state, no augmentation layers; loads with "
        "`keras.saving.load_model(..., safe_mode=True)` once `core` is importable.",
        "",
    ]


def _md_cross_validation(card: dict) -> list[str]:
    m = card["leave_subjects_out"]
    lines = [
        "## Leave-subjects-out cross-validation on the same data (patients unseen by each fold model, from the same "
        "batch)",
        f"{m['folds']} folds by subject, each test fold one healthy donor and about a third of the patients, "
        f"none seen in training; `benchmarks/bench_real.py` ({m['machine']}). Threshold 0.5 on raw "
        "probabilities; 95% CIs resample subjects.",
        "",
        "| method | weighted F1 | balanced accuracy | sensitivity (all) | specificity (all) | ROC AUC |",
        "|---|---|---|---|---|---|",
        *(_md_method_row(name, entry["pooled"]) for name, entry in m["methods"].items()),
        "",
        "Per fold (weighted F1): " + "; ".join(
            f"{name}: " + ", ".join(_f(v["weighted_f1"]) for v in entry["per_fold"].values())
            for name, entry in m["methods"].items()) + ".",
    ]
    if m.get("minus_baseline"):
        d2 = m["minus_baseline"]["weighted_f1"]
        lines.append(f"Starter recipe minus the hand-crafted-feature baseline: weighted F1 {d2['difference']:+.3f} "
                     f"[{d2['ci95'][0]:+.3f}, {d2['ci95'][1]:+.3f}].")
    return [*lines, ""]


def _md_method_row(name: str, pooled: dict) -> str:
    """One method's pooled figures, each with its 95% CI where the benchmark has one."""
    cells = []
    for k in ("weighted_f1", "balanced_accuracy", "sensitivity_all", "specificity_all", "roc_auc"):
        ci = (pooled.get("ci95") or {}).get(k)
        cells.append(f"{_f(pooled[k])}" + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else ""))
    return f"| {name} | " + " | ".join(cells) + " |"


def _md_decision_rule(card: dict) -> list[str]:
    c = card["calibration"]
    return [
        "## Decision rule (calibration)",
        f"Temperature {c['temperature']:.3f}, threshold {c['threshold']:.3f} on the calibrated P(blast), cells within "
        f"{c['band']:.2f} of the threshold flagged for manual review; fitted on {c['fitted_on']}. Expected "
        f"calibration error there: {c['ece_raw']:.3f} raw -> {c['ece_calibrated']:.3f} calibrated; "
        f"{c['review_fraction']:.1%} of those cells fall in the review band.",
        "",
    ]


def _md_gate(card: dict) -> list[str]:
    g = card["gate"]
    return [
        "## What it refuses (out-of-distribution gate)",
        f"Images unlike its training cells get no class (\"not assessed\", with the reason): image checks (one cell on "
        f"black, not cut by the border, cell area {g['image']['area_band'][0]:.3f}-"
        f"{g['image']['area_band'][1]:.3f} of the frame, mean colour inside the training cells' stain "
        f"range) and feature novelty (Mahalanobis distance of its penultimate features above "
        f"{g['novelty_threshold']:.2f}). False rejections: "
        f"{g['false_rejection']['image_rejected_unseen_patients']:.1%} of real cells of unseen patients by the "
        f"image checks (leave-subjects-out); by feature novelty "
        f"{g['false_rejection']['novelty_rejected_left_out_patients']:.1%} of cells of patients left out of "
        f"the Gaussian's fit (its threshold is their 99th percentile; the network itself saw them) and "
        f"{g['false_rejection']['novelty_rejected_in_sample']:.1%} of its training cells. "
        "`benchmarks/bench_gate.py` measures refusals of non-cells.",
        "",
    ]


def _md_known_limits() -> list[str]:
    return [
        "## Known limits",
        "- Three healthy donors only, all from one training fold and one acquisition batch: normal cells of other "
        "donors, labs, stains or cameras may be judged less well than the figures above say.",
        "- Trained and measured on C-NMC-style input: one cell segmented on black, ~450 px tiles at C-NMC's "
        "magnification. Whole smear fields, other magnifications and non-cell images are outside what it can judge.",
        "- The figures come from 14 subjects (wide CIs); the out-of-fold predictions mix three fold models, so the "
        "decision rule is an estimate for this final model.",
        "- Blast calls of cells are not a diagnosis: a patient-level decision needs a clinician and the full workup.",
        "",
    ]


def _md_reproduce(card: dict) -> list[str]:
    return ["Reproduce: " + "; ".join(f"`{cmd}`" for cmd in card["reproduce"]), ""]


def reproduce(spec: str, specs: list[tuple[str, int]], b: dict, quantize: str | None = None) -> list[str]:
    """The commands that remake the benchmark and this model folder (a mixture `a+b`: one benchmark per recipe,
    merged and scored as one ensemble)."""
    parts = spec.split("+")
    cmds = [f"python benchmarks/bench_real.py DATA --recipes {r} --size {b['size']} --per-class {b['per_class']} "
            f"--epochs {b['epochs']} --lr {b['lr']} --seed {min(sd for rc, sd in specs if rc == r)} "
            f"--seeds {sum(rc == r for rc, _ in specs)} --out BENCH_{r}" for r in parts]
    if len(parts) > 1:
        cmds.append(f"python benchmarks/bench_real.py DATA --rescore --out BENCH_{parts[0]} --merge "
                    + " ".join(f"BENCH_{r}" for r in parts[1:]) + f" --ensemble {spec}")
    cmds.append(f"python -m training package DATA --bench BENCH_{parts[0]} --recipe {spec}"
                + (f" --quantize {quantize}" if quantize else ""))
    if quantize:
        cmds.append("python benchmarks/bench_quantize.py " + " ".join(f"BENCH_{r}" for r in parts))
    return cmds


def starter_gate(model, cells: pd.DataFrame, cfg: RunConfig, cache_dir: str, fit_cells: int = 600,
                 seed: int = 0) -> Gate:
    """The starter's out-of-distribution gate, fitted on its training cells, with its false-rejection rates:
    image checks leave-subjects-out (fitted on two folds' patients, applied to the third's: unseen patients),
    feature novelty in-sample (the model saw every cell: its threshold is the 99.5th percentile of the
    training cells' own distances, which unseen patients exceed more often)."""
    from core.decide.gate import ImageGate, fit_gate
    from core.data.imageio import read_image
    from core.image.preprocessing import CropCache
    from core.data.splits import subject_folds

    rng = np.random.default_rng(seed)
    folds = subject_folds(cells, 3)
    images = {p: read_image(p) for p in folds["path"]}
    paths, fold = folds["path"].to_numpy(), folds["fold"].to_numpy()
    refused = 0
    for k in range(folds.attrs["n_folds"]):
        pick = rng.choice(paths[fold != k], min(fit_cells, int((fold != k).sum())), replace=False)
        g = ImageGate.fit([images[p] for p in pick])
        refused += sum(g.check(images[p]) is not None for p in paths[fold == k])
    files = pd.DataFrame({"path": paths, "size": [Path(p).stat().st_size for p in paths],
                          "mtime_ns": [Path(p).stat().st_mtime_ns for p in paths]})
    cache = CropCache.build(files, cache_dir, size=cfg.image_size, progress=False)
    crop_rows = np.sort(rng.choice(len(paths), min(2000, len(paths)), replace=False))
    fit_paths = rng.choice(paths, min(fit_cells, len(paths)), replace=False)
    gate = fit_gate(model, [images[p] for p in fit_paths], np.asarray(cache.array[cache.rows(paths[crop_rows])]),
                    fitted_on=f"C-NMC 2019 fold 1 training cells ({len(fit_paths)} images, {len(crop_rows)} crops)")
    from core.decide.gate import FeatureNovelty, feature_model, features_and_probs

    feats, _ = features_and_probs(feature_model(model), np.asarray(cache.array[cache.rows(paths)]))
    # The model saw every cell, so its training cells' own distances understate new patients'. The threshold is
    # the 99th percentile of distances of each fold's patients from a Gaussian fitted on the other folds'
    # patients (patients the Gaussian never saw), then the Gaussian is refitted on every cell.
    held = np.concatenate([FeatureNovelty.fit(feats[fold != k], feats[fold != k]).score(feats[fold == k])
                           for k in range(folds.attrs["n_folds"])])
    gate.novelty = FeatureNovelty.fit(feats, feats, 99.0, "C-NMC 2019 fold 1 training cells; threshold: 99th "
                                      "percentile of distances of patients left out of the Gaussian's fit")
    gate.novelty.threshold = float(np.percentile(held, 99.0))
    gate.false_rejection = {
        "cells": int(len(paths)),
        "image_rejected_unseen_patients": refused / len(paths),
        "image_method": "leave-subjects-out: image bands fitted on two folds' patients, applied to the third's",
        "novelty_rejected_left_out_patients": float((held > gate.novelty.threshold).mean()),
        "novelty_rejected_in_sample": float(gate.novelty.novel(feats).mean()),
    }
    return gate


def member_columns(columns: Iterable[str], spec: str) -> list[str]:
    """The out-of-fold columns of every member (one per recipe and seed, no TTA) of `a` or of a mixture `a+b`."""
    return [c for r in spec.split("+") for c in columns if c.startswith(f"{r}#s") and not c.endswith("+tta")]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The `package` command's options (CLI: `python -m training package DATA --bench DIR ...`)."""
    ap.add_argument("data")
    ap.add_argument("--bench", required=True, help="a bench_real.py --out folder (results.json, oof_predictions.csv)")
    ap.add_argument("--recipe", default="cross_patient_texture")
    ap.add_argument("--out", default=None, help="model folder to write (default models/starter)")
    ap.add_argument("--name", default="starter-cnmc-fold1")
    ap.add_argument("--target-sensitivity", type=float, default=None)
    ap.add_argument("--band", type=float, default=0.1)
    ap.add_argument("--run", nargs="+", default=None,
                    help="package these completed runs (one per benchmark seed, in seed order; trained with the same "
                         "recipe, budget and seed, split all) instead of training new ones; an entry may also be an "
                         "inference-only .keras file of such a member")
    ap.add_argument("--model", nargs="+", default=None,
                    help="package these model files (one per benchmark seed), trained elsewhere with the recipe and "
                         "the benchmark's budget on every cell (see --train-only)")
    ap.add_argument("--trained-on", default="", help="with --model: where and how it was trained, for the card")
    ap.add_argument("--train-only", default=None, metavar="FILE",
                    help="train, write the inference-only model to FILE and stop (e.g. on a GPU machine; package "
                         "it later where the full tiles are, with --model FILE)")
    ap.add_argument("--crop-margin", type=int, default=100,
                    help="crop rule margin; 0 for crops packed by benchmarks/pack_crops.py (with --train-only)")
    ap.add_argument("--quantize", default=None, choices=("int8",),
                    help="store the members' dense kernels as int8 (benchmarks/bench_quantize.py measures the cost)")
    ap.add_argument("--independent-check", default=None, metavar="FILE",
                    help="a JSON object of figures measured on new patients outside DATA's batch (cells, patients, "
                         "weighted_f1, roc_auc, ece, summary, ...), copied into the card's `independent_check` slot; "
                         "without it the card says the check is not yet run")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--cache-dir", default="cache")


# --- what `package` refuses, checked before any training ----------------------------------------------------------
class PackageError(ValueError):
    """A refusal of `package` in one sentence (printed as `error: ...`) with the exit status it gives: 2 for bad
    input, 1 for a training run that did not complete."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


@dataclass
class Plan:
    """What `package` packages, read and checked before any training: the independent check, the benchmark
    (results.json, its out-of-fold predictions), the ensemble's members (one `recipe#sN` column each) as (recipe,
    seed), the first member's configuration and the run store."""

    check: dict | None
    bench: Path
    results: dict
    oof: pd.DataFrame
    member_cols: list[str]
    specs: list[tuple[str, int]]
    config: RunConfig
    store: RunStore

    @property
    def budget(self) -> dict:
        """The benchmark's training budget, which every member is trained with."""
        return self.results["budget"]


def member_config(args: argparse.Namespace, budget: dict, recipe: str, seed: int) -> RunConfig:
    """The `RunConfig` of one member: the recipe on every cell (split `all`, fixed epochs) with the benchmark's
    budget, so the member is the model the benchmark measured."""
    from training.config import preset

    return preset(recipe, name=args.name, data_dir=args.data, split="all", architecture=budget["architecture"],
                  image_size=budget["size"], samples_per_class=budget["per_class"], epochs=budget["epochs"],
                  batch_size=budget["batch"], learning_rate=budget["lr"], seed=seed, early_stopping=False,
                  runs_dir=args.runs_dir, cache_dir=args.cache_dir, crop_margin=args.crop_margin)


def validate(args: argparse.Namespace) -> Plan:
    """Everything `package` can refuse, checked in one place before any training, so a bad file or a wrong run
    fails in a second, not after hours. Raises `PackageError` with the reason."""
    from core.decide.model_folder import load_independent_check
    from training.store import RunStore

    try:
        check = load_independent_check(args.independent_check) if args.independent_check else None
    except (OSError, ValueError) as exc:
        raise PackageError(f"--independent-check: {exc}") from exc
    bench = Path(args.bench)
    results = json.loads((bench / "results.json").read_text())
    if args.recipe not in results["methods"]:
        raise PackageError(f"{bench} has no results for recipe {args.recipe}")
    b = results["budget"]
    if b.get("ema"):
        raise PackageError(f"{bench} averaged the CNN's weights (--ema {b['ema']}); the trainer has no such option, "
                           "so its members would not be the models measured")
    oof = pd.read_csv(bench / "oof_predictions.csv", dtype={"subject": "str"})
    # the members: one per recipe and seed the benchmark trained (`recipe#sN` columns); `a+b` mixes recipes
    member_cols = member_columns(oof.columns, args.recipe) or [args.recipe]
    specs = [(c.split("#s")[0], int(c.split("#s")[1])) if "#s" in c else (args.recipe, b["seed"]) for c in member_cols]
    plan = Plan(check, bench, results, oof, member_cols, specs, member_config(args, b, *specs[0]),
                RunStore(args.runs_dir))
    given = args.model or args.run
    if given and len(given) != len(specs):
        raise PackageError(f"the benchmark's ensemble has {len(specs)} member(s) ({', '.join(member_cols)}); give "
                           f"one run or model per member, in that order, got {len(given)}")
    if args.run and not args.model:
        for j, (recipe, seed) in enumerate(specs):
            if not _member_file(args.run[j]):
                _check_given_run(args, plan, args.run[j], recipe, seed)
    return plan


def _member_file(entry: str) -> bool:
    """A --run entry that is an inference-only .keras file of a member (e.g. the previous starter's)."""
    return entry.endswith(".keras") and Path(entry).is_file()


def _check_given_run(args: argparse.Namespace, plan: Plan, run_id: str, recipe: str, seed: int) -> None:
    """A run given with --run is the member the benchmark measured: the same recipe, budget and seed, completed."""
    have = plan.store.get_run(run_id)["config"]
    want = member_config(args, plan.budget, recipe, seed).resolved().to_dict()
    differ = sorted(k for k in want if k not in ("name", "runs_dir", "cache_dir") and have.get(k) != want[k])
    if differ:
        raise PackageError(f"run {run_id} differs from recipe {recipe} with the benchmark's budget (seed {seed}) in: "
                           + ", ".join(f"{k} ({have.get(k)!r} != {want[k]!r})" for k in differ))
    _check_completed(plan.store.get_run(run_id), run_id)


def _check_completed(run: dict, run_id: str) -> None:
    if run["status"] != "completed":
        raise PackageError(f"training run {run_id} {run['status']}: {run['error']}", status=1)


# --- the members -----------------------------------------------------------------------------------------------
def member_models(args: argparse.Namespace, plan: Plan) -> tuple[list, list[str]]:
    """The ensemble's networks and what the card calls each, in the benchmark's member order: model files given
    with --model, runs (or member files) given with --run, else runs trained here with the benchmark's budget."""
    from core.nets.models import load_model
    from training.trainer import train

    t0 = time.perf_counter()
    models, run_ids = [], []
    for j, (recipe, seed) in enumerate(plan.specs):
        if args.model:
            run_ids.append(f"{Path(args.model[j]).name}" + (f" ({args.trained_on})" if args.trained_on else ""))
            models.append(load_model(args.model[j]))
            continue
        if args.run and _member_file(args.run[j]):
            # a member trained earlier with this very recipe, budget and seed (e.g. the previous starter's)
            run_ids.append(Path(args.run[j]).name)
            models.append(load_model(args.run[j]))
            continue
        run_id = args.run[j] if args.run else train(member_config(args, plan.budget, recipe, seed), plan.store)
        _check_completed(plan.store.get_run(run_id), run_id)
        print(f"trained run {run_id} ({recipe}, seed {seed}) in {time.perf_counter() - t0:.0f} s", flush=True)
        run_ids.append(run_id)
        models.append(load_model(str(plan.store.run_dir(run_id) / "best.keras")))
    return models, run_ids


def write_train_only(target: str, specs: list[tuple[str, int]], models: list) -> None:
    """--train-only: each member as an inference-only file (the first at `target`), to package elsewhere with
    --model (e.g. trained on a GPU machine, packaged where the full tiles are)."""
    from core.nets.models import inference_model

    for j, m in enumerate(models):
        # members of a mixture may share a seed: name them by recipe and seed
        rc, sd = specs[j]
        path = target if j == 0 else str(Path(target).with_suffix(f".{rc}-s{sd}.keras"))
        inference_model(m).save(path)
        print(f"wrote {path} (inference-only; package with --model, one file per member in the benchmark's order)")


def fit_decision_rule(args: argparse.Namespace, plan: Plan) -> tuple[DecisionRule, np.ndarray, np.ndarray]:
    """The decision rule fitted on the benchmark's out-of-fold predictions of the shipped members' own ensemble
    (no test-time augmentation: inference does not augment), i.e. on patients the fold models never saw.
    Returns (rule, labels, probabilities) for the card's calibration figures."""
    from core.decide.calibration import DecisionRule

    oof = plan.oof
    y, p = (oof["label"] == "all").to_numpy().astype(int), oof[plan.member_cols].to_numpy().mean(axis=1)
    rule = DecisionRule.fit(y, p, args.target_sensitivity, args.band,
                            fitted_on=f"out-of-fold predictions for unseen patients ({len(oof)} cells, "
                                      f"{oof['subject'].nunique()} subjects, leave-subjects-out CV)")
    return rule, y, p


# --- the card (card.json) -----------------------------------------------------------------------------------
RECIPE_FIELDS = ("architecture", "image_size", "cell_standardize", "hed_sigma", "brightness", "contrast", "saturation",
                 "hue", "sharpness", "noise_std", "learning_rate", "batch_size", "epochs", "samples_per_class", "seed")


def build_card(args: argparse.Namespace, plan: Plan, run_ids: list[str], cells: pd.DataFrame, excluded: int,
               resolved: RunConfig, gate: Gate, rule: DecisionRule, y: np.ndarray, p: np.ndarray) -> dict:
    """The starter's card (card.json): what it is, the data, recipe, members, the benchmark's leave-subjects-out
    figures, gate, calibration and how to remake it; one dict, the single source of card.md and of what the
    dashboard shows (its keys, in this order, are the card format)."""
    return {
        "name": args.name,
        "research_use_only": True,
        "task": "one segmented C-NMC-style cell -> all (blast) vs hem (normal)",
        "citation": CITATION,
        "independent_check": plan.check,  # null until a check on new patients has been run
        "data": _card_data(cells, excluded),
        "recipe": {"preset": plan.specs[0][0], **{k: getattr(resolved, k) for k in RECIPE_FIELDS}},
        "training_run": run_ids[0] if len(run_ids) == 1 else run_ids,
        "members": [{"recipe": rc, "seed": sd, "run": r} for (rc, sd), r in zip(plan.specs, run_ids)],
        "input": {"size": resolved.image_size, "crop": "100/450 margin per side, then resize", "dtype": "uint8 RGB"},
        "leave_subjects_out": _card_cross_validation(plan.results, args.recipe),
        "gate": {"image": gate.image.__dict__, "novelty_threshold": gate.novelty.threshold,
                 "false_rejection": gate.false_rejection},
        "calibration": _card_calibration(rule, y, p),
        "weights": _card_weights(args.quantize),
        "reproduce": reproduce(args.recipe, plan.specs, plan.budget, args.quantize),
    }


def _card_data(cells: pd.DataFrame, excluded: int) -> dict:
    return {"description": "C-NMC 2019 training fold 1", "cells": int(len(cells)),
            "cells_by_class": {k: int(v) for k, v in cells["label"].value_counts().items()},
            "subjects": int(cells["subject"].nunique()),
            "subjects_by_class": {k: sorted(g["subject"].unique()) for k, g in cells.groupby("label")},
            "excluded": int(excluded)}


def _card_cross_validation(results: dict, recipe: str) -> dict:
    return {"folds": len(results["folds"]), "fold_subjects": results["folds"], "machine": results["machine"],
            "budget": results["budget"], "methods": {k: {"pooled": v["pooled"], "per_fold": v["per_fold"]}
                                                     for k, v in results["methods"].items() if "pooled" in v},
            "members_alone": results["methods"].get("members", {}),
            "minus_baseline": results["methods"][recipe].get("minus_baseline")}


def _card_calibration(rule: DecisionRule, y: np.ndarray, p: np.ndarray) -> dict:
    from core.decide.calibration import expected_calibration_error

    decided = rule.decide(p)
    return {**rule.__dict__, "ece_raw": expected_calibration_error(y, p),
            "ece_calibrated": expected_calibration_error(y, decided["prob_all_calibrated"]),
            "review_fraction": float(decided["uncertain"].mean())}


def _card_weights(quantize: str | None) -> dict:
    if not quantize:
        return {"quantized": None}
    return {"quantized": quantize, "layers": "the dense kernels, one scale per unit, activations float32; convolutions float32",
            "measured_by": "benchmarks/bench_quantize.py (the benchmark's fold models, float32 vs int8, "
                           "on their own unseen patients)"}


# --- the model folder: one writer for every model folder (the starter here, the smear model's too) -------------
def shippable(model: keras.Model, quantize: str | None = None) -> keras.Model:
    """What a starter member ships as: the network without its training-only layers (`inference_model`), with
    `quantize="int8"` its dense kernels stored as int8 so an ensemble ships small."""
    from core.nets.models import inference_model, quantize_weights

    clean = inference_model(model)
    return quantize_weights(clean, quantize) if quantize else clean


def write_starter_folder(out: str | os.PathLike, models: list, rule: DecisionRule, gate: Gate, card: dict,
                         quantize: str | None = None) -> Path:
    """The starter's model folder: its members made shippable, its card as card.json and card.md (by the one
    writer every model folder shares, `core.decide.model_folder.write_model_folder`)."""
    from core.decide.model_folder import write_model_folder

    return write_model_folder(out, models[0], rule, card, card_markdown(card), gate=gate, members=models[1:],
                              prepare=lambda m: shippable(m, quantize))


# --- the command ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """`python -m training package`: train (or take) the members, fit the decision rule and gate, write the model
    folder and its card. Returns the exit status; a refusal is one `error: ...` line on stderr."""
    try:
        return _package(args)
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status


def _package(args: argparse.Namespace) -> int:
    from core.data.dataset import index
    from core.decide.model_folder import STARTER_DIR

    plan = validate(args)
    models, run_ids = member_models(args, plan)
    if args.train_only:
        write_train_only(args.train_only, plan.specs, models)
        return 0
    rule, y, p = fit_decision_rule(args, plan)
    manifest, problems = index(args.data)
    cells = manifest[manifest["label"].notna()]
    resolved = plan.config.resolved()
    gate = starter_gate(models[0], cells, resolved, args.cache_dir)
    print(f"gate: {json.dumps(gate.false_rejection)}", flush=True)
    card = build_card(args, plan, run_ids, cells, len(problems), resolved, gate, rule, y, p)
    out = Path(args.out) if args.out else STARTER_DIR
    write_starter_folder(out, models, rule, gate, card, args.quantize)
    size_mb = sum(f.stat().st_size for f in out.glob("*.keras")) / 1e6
    print(f"wrote {out} ({len(models)} model file(s), {size_mb:.1f} MB); decision rule: temperature {rule.temperature:.3f}, "
          f"threshold {rule.threshold:.3f}, band {rule.band}")
    return 0
