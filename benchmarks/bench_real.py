"""Benchmark: leave-subjects-out cross-validation on real C-NMC cells, CNN recipes vs a hand-crafted baseline.

    python benchmarks/bench_real.py data/real                     # all budget defaults (about 1 h on 2 cores)
    python benchmarks/bench_real.py data/real --recipes cross_patient_texture,cross_patient,report --epochs 6

Folds are grouped by subject (`core.data.splits.subject_folds`): every test fold holds patients that no model of that
fold saw, of both classes (C-NMC fold 1: 3 folds, one normal subject out each). On the same folds, in the same
run:
  baseline : 24 colour/texture/shape statistics of the segmented cell (`core.image.features`) + logistic regression
  CNN      : each named recipe (`training.config.PRESETS`: the project's default `cross_patient_texture`,
             `cross_patient`, the report's `report`), trained on the training folds for a fixed budget (from
             scratch, or from ImageNet with --architecture efficientnet_lite0 [--freeze-backbone]), no peeking at
             the test fold (no early stopping, threshold 0.5)
Prints per fold and pooled: weighted F1 (the challenge metric), balanced accuracy, sensitivity/specificity for
blasts, ROC AUC with subject-bootstrap 95% CIs, and CNN - baseline with a paired subject-bootstrap CI. Also a
subject-corrected read-out (Pan et al. 2019: each cell's logit averaged with its subject's), labelled as such:
it needs subject ids at prediction time. Out-of-fold predictions and the figures go to --out (results.json),
which the starter model's card cites.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from training.package import member_columns  # noqa: E402 - one rule for the benchmark and the packager

KEYS = ("weighted_f1", "balanced_accuracy", "sensitivity_all", "specificity_all", "roc_auc")


def _metrics(df: pd.DataFrame, n_boot: int, seed: int = 0) -> dict:
    from core.decide.metrics import bootstrap_by_subject, point_metrics

    y = (df["label"] == "all").to_numpy().astype(int)
    point = point_metrics(y, df["prob_all"].to_numpy())
    ci = bootstrap_by_subject(df, n_boot=n_boot, seed=seed) if n_boot else {}
    return {k: point[k] for k in KEYS} | {"ci95": {k: ci.get(k) for k in KEYS}, "cells": int(len(df)),
                                          "subjects": int(df["subject"].nunique())}


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, n_boot: int, seed: int = 0) -> dict:
    """Weighted F1 and ROC AUC of `a` minus `b` on the same cells, with a subject-bootstrap 95% CI."""
    from core.decide.metrics import point_metrics

    y = (a["label"] == "all").to_numpy().astype(int)
    pa, pb = a["prob_all"].to_numpy(), b["prob_all"].to_numpy()
    codes, uniq = pd.factorize(a["subject"])
    members = [np.flatnonzero(codes == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    out = {}
    for key in ("weighted_f1", "roc_auc"):
        diff = point_metrics(y, pa)[key] - point_metrics(y, pb)[key]
        boots = []
        for _ in range(n_boot):
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            if len(np.unique(y[idx])) < 2:
                continue
            boots.append(point_metrics(y[idx], pa[idx])[key] - point_metrics(y[idx], pb[idx])[key])
        ci = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))) if boots else (np.nan, np.nan)
        out[key] = {"difference": float(diff), "ci95": ci}
    return out


def subject_corrected(df: pd.DataFrame, weight: float = 0.5) -> pd.DataFrame:
    """Pan et al.'s correction (`core.decide.calibration.subject_corrected`) of a table's `prob_all` by its `subject`."""
    from core.decide.calibration import subject_corrected as correct

    return df.assign(prob_all=correct(df["prob_all"].to_numpy(), df["subject"], weight)[0])


def baseline_predictions(folds: pd.DataFrame, images, rows: np.ndarray, seed: int) -> np.ndarray:
    from core.image.features import feature_baseline, feature_matrix

    t0 = time.perf_counter()
    X = feature_matrix(images, rows)
    print(f"  features of {len(rows)} cells in {time.perf_counter() - t0:.0f} s", flush=True)
    y = (folds["label"] == "all").to_numpy().astype(int)
    p = np.zeros(len(folds))
    for k in sorted(folds["fold"].unique()):
        test = folds["fold"].to_numpy() == k
        p[test] = feature_baseline(seed).fit(X[~test], y[~test]).predict_proba(X[test])[:, 1]
    return p


def earlier_baseline(csv: str, oof: pd.DataFrame) -> np.ndarray:
    """The baseline's out-of-fold probabilities from an earlier run on the same cells and folds (matched by file
    stem, so crops packed for another machine match their tiles); refuses anything that does not cover them."""
    old = pd.read_csv(csv)
    if "baseline" not in old.columns:
        raise ValueError(f"{csv} has no baseline column")
    old = old.assign(stem=[Path(p).stem for p in old["path"]]).drop_duplicates("stem").set_index("stem")
    stems = pd.Index([Path(p).stem for p in oof["path"]])
    missing = stems.difference(old.index)
    if len(missing):
        raise ValueError(f"{csv} lacks {len(missing)} of these cells (e.g. {missing[0]})")
    if "fold" in old.columns and not (old.loc[stems, "fold"].to_numpy() == oof["fold"].to_numpy()).all():
        raise ValueError(f"{csv} was made with other folds: its baseline would have seen test patients")
    return old.loc[stems, "baseline"].to_numpy(float)


def cell_crops(manifest: pd.DataFrame, paths, cache_dir: str, size: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """The crop cache of these cells at `size` (built once per size and margin, then reused) and their rows in it,
    in the order of `paths`: what every benchmark on these cells reads."""
    from core.image.preprocessing import CropCache

    files = manifest.set_index("path").loc[list(paths), ["size", "mtime_ns"]].reset_index()
    cache = CropCache.build(files, cache_dir, size=size, margin=margin, progress=False)
    return cache.array, cache.rows(paths)


def cnn_predictions(recipe: str, folds: pd.DataFrame, images, rows: np.ndarray, args) -> dict[str, np.ndarray]:
    """Out-of-fold P(all) of `recipe`: one column per seed (`recipe#sK`, and `recipe#sK+tta` with --tta) and
    the recipe's own column, their mean (an ensemble of --seeds models per fold; TTA views if --tta)."""
    import keras

    from core.decide.inference import predict_proba
    from training.config import preset
    from training.data import BalancedBatches
    from training.trainer import build_model, input_mean

    y = (folds["label"] == "all").to_numpy().astype(int)
    cols: dict[str, np.ndarray] = {}
    for j in range(args.seeds):
        seed = args.seed + j
        cfg = preset(recipe, architecture=args.architecture, image_size=args.size,
                     samples_per_class=args.per_class, epochs=args.epochs, batch_size=args.batch,
                     learning_rate=args.lr, seed=seed, crop_margin=args.crop_margin, init=args.init,
                     freeze_backbone=args.freeze_backbone).resolved()
        name = f"{recipe}#s{seed}"
        cols[name] = np.zeros(len(folds))
        if args.tta:
            cols[name + "+tta"] = np.zeros(len(folds))
        for k in map(int, sorted(folds["fold"].unique())):
            keras.utils.clear_session()
            keras.utils.set_random_seed(cfg.seed + k)
            test = folds["fold"].to_numpy() == k
            tr_rows, tr_y = rows[~test], y[~test]
            model = build_model(cfg, input_mean(cfg, images, tr_rows))
            t0 = time.perf_counter()
            pools = [tr_rows[tr_y == c] for c in (0, 1)]

            def show(e, logs):
                print(f"  {name} fold {k} epoch {e + 1}/{cfg.epochs}: loss {logs['loss']:.4f} "
                      f"acc {logs['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

            if args.ema:
                # Polyak averaging of the weights (Keras' use_ema), the averaged weights kept at the end of the one
                # fit over all epochs (the same batches as the epoch loop below: a draw depends on seed and epoch)
                model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate, use_ema=True,
                                                              ema_momentum=args.ema),
                              loss="categorical_crossentropy", metrics=["accuracy"])
                data = BalancedBatches(images, pools, cfg.samples_per_class, cfg.batch_size,
                                       seed=cfg.seed + 100 * k, epochs=cfg.epochs)
                model.fit(data, epochs=cfg.epochs, steps_per_epoch=data.steps, verbose=0,
                          callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=show)])
            else:
                for e in range(cfg.epochs):
                    data = BalancedBatches(images, pools, cfg.samples_per_class, cfg.batch_size,
                                           seed=cfg.seed + 100 * k, first_epoch=e)
                    h = model.fit(data, epochs=e + 1, initial_epoch=e, verbose=0)
                    show(e, {key: v[-1] for key, v in h.history.items()})
            crops = np.asarray(images[rows[test]])
            cols[name][test] = predict_proba([model], crops)
            if args.tta:
                cols[name + "+tta"][test] = predict_proba([model], crops, tta=True)
            m = _metrics(folds[test].assign(prob_all=cols[name][test]), 0)
            print(f"  {name} fold {k}: weighted F1 {m['weighted_f1']:.3f}, AUC {m['roc_auc']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.save_models:
                model.save(Path(args.out) / (f"{recipe}_fold{k}" + (f"_s{seed}" if args.seeds > 1 else "") + ".keras"))
        # what is done so far, readable while later seeds train
        folds[["path", "subject", "label", "fold"]].assign(**cols).to_csv(
            Path(args.out) / f"oof_partial_{recipe}.csv", index=False)
    return cols | ensembles(cols, recipe)


def ensembles(cols, recipe: str) -> dict[str, np.ndarray]:
    """The recipe's own columns from its members': `recipe`, the mean P(all) of its seeds, and with TTA views
    `recipe+tta`, the mean of their TTA predictions."""
    out = {}
    for suffix in ("", "+tta"):
        members = [c for c in cols if c.startswith(f"{recipe}#s") and c.endswith("+tta") == (suffix == "+tta")]
        if members:
            out[recipe + suffix] = np.mean([np.asarray(cols[c]) for c in members], axis=0)
    return out


def _fmt(m: dict) -> str:
    parts = []
    for k in KEYS:
        ci = m["ci95"].get(k) if m.get("ci95") else None
        parts.append(f"{k} {m[k]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a labelled C-NMC folder with UID_ names (any supported layout)")
    ap.add_argument("--recipes", default="cross_patient_texture,report", help="comma-separated preset names")
    ap.add_argument("--architecture", default="solution_a")
    ap.add_argument("--init", default=None, help="none, imagenet or a weights file (default: the architecture's; "
                                                 "imagenet for efficientnet_lite0, offline)")
    ap.add_argument("--freeze-backbone", action="store_true", help="train the dense head only")
    ap.add_argument("--size", type=int, default=64, help="CNN input size (budget)")
    ap.add_argument("--per-class", type=int, default=1000, help="cells per class per epoch (budget)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per fold (budget)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--feature-size", type=int, default=128, help="crop size the baseline's features use")
    ap.add_argument("--tta", action="store_true", help="CNN predictions averaged over the 8 dihedral views")
    ap.add_argument("--seeds", type=int, default=1,
                    help="models per fold with seeds seed, seed+1, ...: the recipe's figure is their ensemble "
                         "(mean P(all)); each seed alone is printed beside it")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep an exponential moving average of the CNN's weights with this momentum (e.g. 0.99) "
                         "and predict with it; 0 = the last weights")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--crop-margin", type=int, default=100,
                    help="crop rule margin of a 450 px tile; 0 for crops made beforehand (benchmarks/pack_crops.py)")
    ap.add_argument("--out", default=None, help="folder for results.json and out-of-fold predictions")
    ap.add_argument("--save-models", action="store_true", help="keep each fold's model in --out")
    ap.add_argument("--rescore", action="store_true",
                    help="no training: recompute results.json in --out from its oof_predictions.csv (e.g. after "
                         "this script's scoring changed); DATA is not read")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="with --rescore: add the CNN columns of these earlier runs (same cells, folds and budget)")
    ap.add_argument("--ensemble", nargs="+", default=None, metavar="A+B",
                    help="with --rescore: also score the mean of these recipes' members, e.g. "
                         "cross_patient_texture+report")
    ap.add_argument("--baseline-oof", default=None,
                    help="reuse the baseline column of an earlier run's oof_predictions.csv (same cells, matched by "
                         "file stem; same folds) instead of recomputing the features: one baseline for many budgets")
    args = ap.parse_args(argv)
    if args.rescore:
        return rescore(args)

    from core.data.dataset import index
    from core.data.splits import subject_folds

    if not Path(args.data).is_dir():
        print(f"error: {args.data} is not a folder", file=sys.stderr)
        return 2
    manifest, problems = index(args.data)
    try:
        folds = subject_folds(manifest, args.folds)
    except ValueError as exc:
        print(f"error: {args.data}: {exc}", file=sys.stderr)
        return 2
    recipes = [r for r in args.recipes.split(",") if r]
    from training.config import PRESETS

    unknown = [r for r in recipes if r not in PRESETS]
    if unknown:
        print(f"error: unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    args.out = args.out or f"runs/bench_real/{time.strftime('%Y%m%d-%H%M%S')}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    k = folds.attrs["n_folds"]
    print(f"data {args.data}: {len(folds)} cells, {folds['subject'].nunique()} subjects "
          f"({len(problems)} files excluded by the indexer); {k} leave-subjects-out folds")
    for f in range(k):
        part = folds[folds["fold"] == f]
        desc = "; ".join(f"{lab} {len(g)} cells ({', '.join(sorted(g['subject'].unique()))})"
                         for lab, g in part.groupby("label"))
        print(f"  fold {f}: {desc}")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    budget = {k2: getattr(args, k2) for k2 in ("architecture", "size", "per_class", "epochs", "batch", "lr", "tta",
                                               "feature_size", "seed", "seeds", "crop_margin", "ema", "init",
                                               "freeze_backbone")}
    print(f"machine: {machine}; budget: {json.dumps(budget)}", flush=True)

    oof = folds[["path", "subject", "label", "fold"]].copy()
    t0 = time.perf_counter()
    if args.baseline_oof:
        try:
            oof["baseline"] = earlier_baseline(args.baseline_oof, oof)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"baseline: reused from {args.baseline_oof}", flush=True)
        budget["baseline_from"] = str(args.baseline_oof)
    else:
        fimages, frows = cell_crops(manifest, folds["path"], args.cache_dir, args.feature_size, args.crop_margin)
        print("baseline (features + logistic regression):", flush=True)
        oof["baseline"] = baseline_predictions(folds, fimages, frows, args.seed)
    seconds = {"baseline": time.perf_counter() - t0}
    images, rows = cell_crops(manifest, folds["path"], args.cache_dir, args.size, args.crop_margin)
    for r in recipes:
        print(f"CNN recipe {r}:", flush=True)
        t0 = time.perf_counter()
        for col, p in cnn_predictions(r, folds, images, rows, args).items():
            oof[col] = p
        seconds[r] = time.perf_counter() - t0
        oof.to_csv(Path(args.out) / "oof_predictions.csv", index=False)

    results = {"data": str(args.data), "cells": int(len(folds)), "subjects": int(folds["subject"].nunique()),
               "folds": {int(f): sorted(folds.loc[folds["fold"] == f, "subject"].unique()) for f in range(k)},
               "machine": machine, "budget": budget, "seconds": seconds, "methods": {}}
    score(oof, recipes, results, args)
    return 0


def score(oof: pd.DataFrame, recipes: list[str], results: dict, args) -> dict:
    """Print and write (results.json in --out) every method's figures from the out-of-fold predictions."""
    k = int(oof["fold"].nunique())
    methods = ["baseline"] + [m for r in recipes for m in (r, r + "+tta") if m in oof]
    print("\nResults (threshold 0.5; 95% CIs resample subjects):")
    for method in methods:
        df = oof.rename(columns={method: "prob_all"})
        entry = {"pooled": _metrics(df, args.n_boot, args.seed),
                 "per_fold": {int(f): _metrics(df[df["fold"] == f], 0) for f in range(k)}}
        corrected = subject_corrected(df)
        entry["subject_corrected_pooled"] = _metrics(corrected, 0)
        results["methods"][method] = entry
        print(f"{method:>14} pooled: {_fmt(entry['pooled'])}")
        for f in range(k):
            print(f"{'':>14} fold {f}: {_fmt(entry['per_fold'][f])}")
        print(f"{'':>14} subject-corrected (needs subject ids): weighted_f1 "
              f"{entry['subject_corrected_pooled']['weighted_f1']:.3f}")
    members = [c for c in oof.columns if "#" in c]
    if members:
        print("members (each seed alone, the same folds; pooled, no CI):")
        for c in members:
            m = _metrics(oof.rename(columns={c: "prob_all"}), 0)
            results["methods"].setdefault("members", {})[c] = m
            print(f"{c:>30}: {_fmt(m)}")
    for r in methods[1:]:
        a, b = oof.rename(columns={r: "prob_all"}), oof.rename(columns={"baseline": "prob_all"})
        diff = paired_difference(a, b, args.n_boot, args.seed)
        results["methods"][r]["minus_baseline"] = diff
        print(f"{r} - baseline: weighted F1 {diff['weighted_f1']['difference']:+.3f} "
              f"[{diff['weighted_f1']['ci95'][0]:+.3f}, {diff['weighted_f1']['ci95'][1]:+.3f}], ROC AUC "
              f"{diff['roc_auc']['difference']:+.3f} [{diff['roc_auc']['ci95'][0]:+.3f}, "
              f"{diff['roc_auc']['ci95'][1]:+.3f}]")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwritten: {args.out}/results.json, {args.out}/oof_predictions.csv")
    return results


BUDGET_KEYS = ("architecture", "size", "per_class", "epochs", "batch", "lr", "crop_margin", "ema")
BUDGET_DEFAULTS = {"ema": 0.0}  # budgets written before the key existed


def rescore(args) -> int:
    """Recompute results.json of an earlier run (--out DIR) from its oof_predictions.csv, no training; with
    --merge, first take in the CNN columns of other runs on the same cells, folds and budget; with --ensemble,
    also score the mean of several recipes' members (`a+b`)."""
    out = Path(args.out)
    try:
        oof = pd.read_csv(out / "oof_predictions.csv", dtype={"subject": "str"})
        old = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
        for other in args.merge or []:
            more = pd.read_csv(Path(other) / "oof_predictions.csv", dtype={"subject": "str"})
            theirs = json.loads((Path(other) / "results.json").read_text()).get("budget", {})
            mine = old.get("budget", {})
            if list(more["path"]) != list(oof["path"]) or list(more["fold"]) != list(oof["fold"]):
                raise ValueError(f"{other} was run on other cells or folds")
            differ = [k for k in BUDGET_KEYS
                      if mine.get(k, BUDGET_DEFAULTS.get(k)) != theirs.get(k, BUDGET_DEFAULTS.get(k))]
            if differ:
                raise ValueError(f"{other} has another budget ({', '.join(differ)})")
            for c in more.columns:
                if "#" in c and c not in oof:
                    oof[c] = more[c]
            old.setdefault("merged_from", []).append(str(other))
    except (OSError, ValueError) as exc:
        print(f"error: cannot rescore {out}: {exc}", file=sys.stderr)
        return 2
    recipes = sorted({c.split("#")[0] for c in oof.columns if "#" in c}
                     | {r for r in args.recipes.split(",") if r in oof})
    for r in recipes:
        for col, p in ensembles({c: oof[c] for c in oof.columns if c.startswith(r + "#s")}, r).items():
            oof[col] = p
    for spec in args.ensemble or []:
        parts = spec.split("+")
        missing = [r for r in parts if r not in recipes]
        if missing:
            print(f"error: --ensemble {spec}: no members of {', '.join(missing)} in {out}", file=sys.stderr)
            return 2
        oof[spec] = oof[member_columns(oof.columns, spec)].mean(axis=1)
        recipes.append(spec)
    oof.to_csv(out / "oof_predictions.csv", index=False)
    results = {key: old[key] for key in ("data", "cells", "subjects", "folds", "machine", "budget", "seconds",
                                         "merged_from") if key in old}
    results |= {"methods": {}, "rescored_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    score(oof, recipes, results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
