"""Benchmark: smear photos to per-cell calls and a field call, on ALL-IDB1's even photos, by cross-validation over
photos, side by side with two baselines in one run.

    python benchmarks/bench_fields.py data/allidb [--folds 5] [--cache cache] [--out runs/bench_fields]

Data: ALL-IDB (Labati, Piuri, Scotti, "ALL-IDB: the acute lymphoblastic leukemia image database for image
processing", IEEE ICIP 2011), ALL-IDB1 even-numbered photos only (`core.allidb`; the odd ones are reserved for an
independent check), blast centroids from the dataset, other annotated objects from AngeloUNIMI/ALL-IDB-Patches.
Folds: stratified by the cells' labels, grouped by photo (no photo's cells on both sides).

Methods (each finds its own cells, so "found" is per method):
- **product**: `core.segmentation` + the smear network (ImageNet EfficientNet-Lite0, frozen, reading each cell on
  black and in its context window; logistic head on 128 principal components, fitted on the 8 dihedral views of
  the training photos' cells) + its gate (feature novelty, threshold from held-out folds), threshold 0.5;
- **starter**: the same cells, stain-normalised toward C-NMC's, judged by the shipped C-NMC starter with its own
  rule and gate (today's field path with `--normalize-stain`); nothing is fitted on ALL-IDB;
- **plain**: the issue's plain baseline: violet-minus-green Otsu threshold + distance watershed for finding, a square
  window around each object (with its surroundings, not masked), frozen Lite0 features of one view + logistic
  regression, no gate.

Figures: annotated blasts found one-to-one (centroid inside one found box), found objects on no annotated object
(platelets, debris, red-cell clumps, and also real white cells the annotators did not mark: an upper bound on
non-white-cell finds), judged share, cell-level sensitivity / specificity / ROC AUC (judged cells; label `all` = a
found box holding a blast centroid), share of `all` calls on an annotated blast, share of found blasts called
`all`, field-level calls (core.fields.CallRule: `blasts` on ALL photos, `no blasts` on healthy ones), seconds per
field (segmentation + classification, product only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def cell_metrics(table: pd.DataFrame, photos: pd.DataFrame) -> dict:
    """The figures of one method from its per-cell table: photo, label, annotation, judged, prediction, p."""
    from core.fields import CallRule, field_readout

    from training.smear import cell_figures

    out = {
        "annotated_blasts": int(photos["blasts"].sum()),
        "blasts_found": int(photos["blasts_found"].sum()),
        "found": int(len(table)),
        "found_on_no_annotation": int((table["annotation"] == "none").sum()),
        **cell_figures(table),
    }
    cells = table.assign(field=table["photo"], prob_all_calibrated=table["p"], uncertain=False,
                         ood_reason=np.where(table["judged"], None, "refused"), error=None)
    cells.loc[~table["judged"], "prediction"] = None
    read = field_readout(cells, list(photos["photo"]), {}, CallRule(), pooled=False).set_index("field")
    calls = read.loc[photos["photo"], "call"].to_numpy()
    is_all = (photos["photo_label"] == "all").to_numpy()
    out["fields_blasts_all_photos"] = f"{int((calls[is_all] == 'blasts').sum())}/{int(is_all.sum())}"
    out["fields_blasts_healthy_photos"] = f"{int((calls[~is_all] == 'blasts').sum())}/{int((~is_all).sum())}"
    out["fields_cannot_judge"] = int((calls == "cannot judge").sum())
    out["field_accuracy"] = float(((calls == "blasts") == is_all).mean())
    return out


def starter(fc) -> pd.DataFrame:
    from core.inference import classify
    from core.model_folder import load_model_folder
    from core.stain import reinhard

    mf = load_model_folder("starter")
    items = [(f"{r.photo}_cell{r.cell:02d}.png", np.rint(reinhard(c)).astype(np.uint8))
             for r, c in zip(fc.table.itertuples(), fc.crops)]
    res = classify(mf.models, items, mf.size, mf.rule, gate=mf.gate, margin=mf.crop_margin)
    judged = res["prediction"].notna().to_numpy()
    return fc.table.assign(p=res["prob_all_calibrated"].fillna(0.0).to_numpy(), judged=judged,
                           prediction=res["prediction"].to_numpy())


def plain_cells(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The plain baseline's finding: Otsu on violet minus green at quarter size, holes filled, small objects
    dropped, touching objects split by a distance watershed; boxes in field pixels."""
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology, segmentation
    from skimage.feature import peak_local_max
    from skimage.transform import rescale

    x = rescale(img.astype(np.float32), 0.25, channel_axis=-1, anti_aliasing=True)
    v = (x[..., 0] + x[..., 2]) / 2 - x[..., 1]
    # Otsu, but never inside the background / red-cell mode (a healthy photo's one white cell is too few pixels
    # for Otsu to find alone)
    cut = max(filters.threshold_otsu(v), float(np.median(v)) + 25.0)
    mask = ndi.binary_fill_holes(ndi.binary_opening(v > cut, morphology.disk(2)))
    lab = measure.label(mask)
    areas = np.bincount(lab.ravel())[1:]
    if not len(areas):
        return []
    # platelets and debris: far smaller than the field's large objects
    mask = np.isin(lab, 1 + np.nonzero(areas >= 0.25 * np.percentile(areas, 90))[0])
    dist = ndi.distance_transform_edt(mask)
    r = max(3, int(np.sqrt(np.percentile(areas, 90) / np.pi)))
    peaks = peak_local_max(dist, min_distance=r, labels=measure.label(mask), exclude_border=False)
    markers = np.zeros(mask.shape, int)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    lab = segmentation.watershed(-dist, markers, mask=mask)
    return [(p.bbox[1] * 4, p.bbox[0] * 4, p.bbox[3] * 4, p.bbox[2] * 4) for p in measure.regionprops(lab)]


def plain(root, photos_df, fold_of_photo: dict, model) -> tuple[pd.DataFrame, pd.DataFrame]:
    from core.allidb import centroids
    from core.imageio import read_image

    from sklearn.linear_model import LogisticRegression

    from training.smear import PAIR_TILE, label_cells, pooled_features

    from PIL import Image

    rows, crops, stats = [], [], []
    for p in photos_df.itertuples():
        img = read_image(p.path)
        boxes = plain_cells(img)
        pts = centroids(root, p.photo)
        ann = label_cells(boxes, pts["blasts"], pts["others"])
        h, w = img.shape[:2]
        for (x0, y0, x1, y1), a in zip(boxes, ann):
            cx, cy, s = (x0 + x1) // 2, (y0 + y1) // 2, int(0.75 * max(x1 - x0, y1 - y0)) + 8
            win = img[max(0, cy - s):min(h, cy + s), max(0, cx - s):min(w, cx + s)]
            crops.append(np.asarray(Image.fromarray(win).resize((PAIR_TILE, PAIR_TILE), Image.Resampling.BILINEAR)))
            rows.append({"photo": p.photo, "photo_label": p.label, "annotation": a,
                         "label": "all" if a == "blast" else "hem"})
        stats.append({"photo": p.photo, "photo_label": p.label, "blasts": len(pts["blasts"]),
                      "blasts_found": ann.count("blast"), "cells_found": len(boxes)})
    table = pd.DataFrame(rows)
    feats = pooled_features(model, [np.stack(crops)], layer="pool")[:, 0]
    y = (table["label"] == "all").to_numpy().astype(int)
    fold = table["photo"].map(fold_of_photo).to_numpy()
    p = np.zeros(len(y))
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        lr = LogisticRegression(C=1.0, max_iter=3000).fit(feats[tr], y[tr])
        p[te] = lr.predict_proba(feats[te])[:, 1]
    table = table.assign(p=p, judged=True, prediction=np.where(p >= 0.5, "all", "hem"))
    return table, pd.DataFrame(stats)


def seconds_per_field(photos_df, model, head, n: int = 6) -> float:
    """Segmentation + network on whole photos (the 2592x1944 ones first), median of `n`."""
    from core.imageio import read_image
    from core.segmentation import segment_field

    from training.smear import network_inputs, pooled_features

    big = photos_df.sort_values("width", ascending=False).head(n)
    times = []
    for p in big.itertuples():
        img = read_image(p.path)
        t0 = time.perf_counter()
        res = segment_field(img, p.photo)
        if res.cells:
            head.probs(pooled_features(model, [network_inputs(crops=[c.crop for c in res.cells],
                                                              contexts=[c.context for c in res.cells])]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="the ALL-IDB folder (ALL_IDB1/ with im/, xyc/, other/)")
    ap.add_argument("--folds", type=int, default=5)
    from training.config import RunConfig

    ap.add_argument("--cache", default=RunConfig().cache_dir, help="where the segmented cells are cached")
    ap.add_argument("--out", default="runs/bench_fields")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip (starter, plain)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    from core.allidb import read_allidb1

    from training.smear import collect_field_cells, cross_validate, dihedral_features, fit_head, photo_folds, \
        smear_network

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fc = collect_field_cells(args.data, args.cache)
    print(f"{len(fc.photos)} even photos, {len(fc.table)} cells found ({(fc.table['label'] == 'all').sum()} on an "
          f"annotated blast) in {time.time() - t0:.0f} s")
    model = smear_network()
    feats = dihedral_features(model, fc)
    fold = photo_folds(fc.table, args.folds)
    fold_of_photo = dict(zip(fc.table["photo"], fold))
    photos_df = read_allidb1(args.data).photos
    # photos with no cell found get a fold too (they still count in the field figures)
    for i, ph in enumerate(photos_df["photo"]):
        fold_of_photo.setdefault(ph, i % args.folds)

    results, tables = {}, {}
    tables["product"] = cross_validate(fc, feats, fold)
    results["product"] = cell_metrics(tables["product"], fc.photos)
    y = (fc.table["label"] == "all").to_numpy().astype(int)
    results["product"]["seconds_per_field"] = seconds_per_field(photos_df, model, fit_head(feats, y))
    if "starter" not in skip:
        tables["starter"] = starter(fc)
        results["starter"] = cell_metrics(tables["starter"], fc.photos)
    if "plain" not in skip:
        from core.models import imagenet_backbone

        tables["plain"], plain_photos = plain(args.data, photos_df, fold_of_photo,
                                              imagenet_backbone("efficientnet_lite0", include_top=False))
        results["plain"] = cell_metrics(tables["plain"], plain_photos)

    keys = ["blasts_found", "found", "found_on_no_annotation", "judged_share", "sensitivity", "specificity", "roc_auc",
            "all_calls_on_blast", "found_blasts_called_all", "fields_blasts_all_photos",
            "fields_blasts_healthy_photos", "fields_cannot_judge", "field_accuracy", "seconds_per_field"]
    frame = pd.DataFrame({m: {k: r.get(k, "") for k in keys} for m, r in results.items()})
    frame.loc["blasts_found"] = [f"{r['blasts_found']}/{r['annotated_blasts']} = "
                                 f"{r['blasts_found'] / max(1, r['annotated_blasts']):.3f}" for r in results.values()]
    print(f"ALL-IDB1 even photos, {args.folds}-fold cross-validation over photos:")
    print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    for m, t in tables.items():
        t.to_csv(out / f"cells_{m}.csv", index=False)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
