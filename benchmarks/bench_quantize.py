"""Benchmark: what int8 weights cost a shipped model, measured leave-subjects-out on real cells.

    python benchmarks/bench_quantize.py runs/bench_real/seeds64 runs/bench_real/report64

Takes `bench_real.py --save-models` output folders (each holds `oof_predictions.csv` and one model per fold,
`<recipe>_fold<k>[_s<seed>].keras`). Every fold model predicts the cells of its own test fold (patients it never
saw) twice, as saved (float32) and with its dense layers quantised to int8 (`core.nets.models.quantize_weights`, what
`python -m training package --quantize int8` ships), side by side in one run. Prints per model and for the ensemble of all
given models (their mean P(all), as a model folder computes it): pooled weighted F1 and ROC AUC at threshold 0.5,
the largest |P(all) change| over the cells, and the file-size ratio int8 / float32.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

MODEL_NAME = re.compile(r"^(?P<recipe>.+)_fold(?P<fold>\d+)(?:_s(?P<seed>\d+))?\.keras$")


def fold_models(folders: list[str]) -> tuple[pd.DataFrame, list[tuple[str, int, Path]]]:
    """The cells and folds the folders share, and every (member name, fold, model file) in them."""
    oof, found = None, []
    for folder in map(Path, folders):
        csv = folder / "oof_predictions.csv"
        if not csv.exists():
            raise ValueError(f"{folder} has no oof_predictions.csv (not a bench_real.py --out folder)")
        cells = pd.read_csv(csv, dtype={"subject": "str"})[["path", "subject", "label", "fold"]]
        if oof is None:
            oof = cells
        elif list(cells["path"]) != list(oof["path"]) or list(cells["fold"]) != list(oof["fold"]):
            raise ValueError(f"{folder} was run on other cells or folds than {folders[0]}")
        for p in sorted(folder.glob("*.keras")):
            m = MODEL_NAME.match(p.name)
            if m:
                found.append((f"{m['recipe']}#s{m['seed'] or 0}@{folder.name}", int(m["fold"]), p))
    if not found:
        raise ValueError("no fold models (<recipe>_fold<k>[_s<seed>].keras) in " + ", ".join(folders))
    return oof, found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="bench_real.py --save-models output folders")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--crop-margin", type=int, default=100)
    args = ap.parse_args(argv)
    try:
        oof, found = fold_models(args.folders)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from bench_real import _metrics, cell_crops

    from core.data.dataset import index
    from core.decide.inference import predict_proba
    from core.nets.models import load_model, quantize_weights

    missing = [p for p in oof["path"] if not Path(p).exists()]
    if missing:
        print(f"error: {len(missing)} cells of the benchmark are gone (e.g. {missing[0]})", file=sys.stderr)
        return 2
    manifest, _ = index(str(Path(os.path.commonpath(list(oof["path"])))))
    caches: dict[int, tuple] = {}
    cols: dict[str, dict[str, np.ndarray]] = {"float32": {}, "int8": {}}
    sizes = {"float32": 0, "int8": 0}
    folds = oof["fold"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for name, k, path in found:
            model = load_model(str(path))
            size = int(model.inputs[0].shape[1])
            if size not in caches:
                caches[size] = cell_crops(manifest, oof["path"], args.cache_dir, size, args.crop_margin)
            images, rows = caches[size]
            crops = np.asarray(images[rows[folds == k]])
            for kind in ("float32", "int8"):
                if kind == "int8":
                    model = quantize_weights(model)
                saved = Path(tmp) / f"{kind}.keras"
                model.save(saved)
                sizes[kind] += saved.stat().st_size
                col = cols[kind].setdefault(name, np.full(len(oof), np.nan))
                col[folds == k] = predict_proba([load_model(str(saved))], crops)
            print(f"  {name} fold {k}: |dP| max {np.abs(cols['int8'][name] - cols['float32'][name])[folds == k].max():.2e}",
                  flush=True)
    complete = [n for n in cols["float32"] if not np.isnan(cols["float32"][n]).any()]
    print(f"\n{len(oof)} cells, {oof['subject'].nunique()} subjects, {len(set(folds))} leave-subjects-out folds; "
          f"each model scored on its own test fold (threshold 0.5)")
    print(f"{'':>44} {'wF1 fp32':>9} {'wF1 int8':>9} {'AUC fp32':>9} {'AUC int8':>9} {'|dP| max':>9}")

    def line(label, pf, pq):
        a = _metrics(oof.assign(prob_all=pf), 0)
        b = _metrics(oof.assign(prob_all=pq), 0)
        print(f"{label:>44} {a['weighted_f1']:9.3f} {b['weighted_f1']:9.3f} {a['roc_auc']:9.3f} "
              f"{b['roc_auc']:9.3f} {np.abs(pq - pf).max():9.2e}")

    for n in complete:
        line(n, cols["float32"][n], cols["int8"][n])
    if len(complete) > 1:
        line(f"ensemble of {len(complete)}", np.mean([cols["float32"][n] for n in complete], axis=0),
             np.mean([cols["int8"][n] for n in complete], axis=0))
    print(f"file size int8 / float32: {sizes['int8'] / sizes['float32']:.3f} "
          f"({sizes['int8'] / len(found) / 1e6:.2f} MB vs {sizes['float32'] / len(found) / 1e6:.2f} MB a model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
