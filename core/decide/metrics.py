"""Evaluation metrics the way the C-NMC challenge and the report judged models, and beyond.

Everything takes a predictions table (one row per cell: label `all`/`hem`, `prob_all`, `subject`) so single
runs, ensembles and TTA are evaluated by the same code. Confidence intervals resample subjects, not cells:
cells of one person are correlated, so a cell-level bootstrap would be falsely narrow.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

TARGET_NAMES = ["Hem", "All"]  # the report's row names; index 1 = positive class (blast)
# figures that need cells of both classes; the one a class's absence undefines, per missing class
BOTH_CLASSES = ("weighted_f1", "balanced_accuracy", "roc_auc", "pr_auc")
RATE_OF = {"hem": "specificity_all", "all": "sensitivity_all"}
HEADLINE = ("weighted_f1", "Weighted F1 (challenge)")


def _arrays(preds: pd.DataFrame, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if preds["label"].isna().any():
        raise ValueError("metrics need labelled cells; drop unlabelled rows first")
    y = (preds["label"] == "all").to_numpy().astype(int)
    p = preds["prob_all"].to_numpy(dtype=float)
    return y, p, (p >= threshold).astype(int)


def report_table(preds: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """The report's Tables 2-3: precision, recall, f1-score, support for Hem and All, accuracy, averages."""
    y, _, yhat = _arrays(preds, threshold)
    rep = skm.classification_report(y, yhat, labels=[0, 1], target_names=TARGET_NAMES, output_dict=True,
                                    zero_division=0)
    table = pd.DataFrame(rep).T[["precision", "recall", "f1-score", "support"]]
    acc = rep["accuracy"]
    table.loc["accuracy"] = [np.nan, np.nan, acc, table.loc["macro avg", "support"]]
    table["support"] = table["support"].astype(int)
    return table.loc[TARGET_NAMES + ["accuracy", "macro avg", "weighted avg"]]


def confusion(preds: pd.DataFrame, threshold: float = 0.5) -> np.ndarray:
    """2x2 counts, rows = true (Hem, All), columns = predicted (Hem, All)."""
    y, _, yhat = _arrays(preds, threshold)
    return skm.confusion_matrix(y, yhat, labels=[0, 1])


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    yhat = (p >= threshold).astype(int)
    tp = int(((yhat == 1) & (y == 1)).sum())
    tn = int(((yhat == 0) & (y == 0)).sum())
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    out = {
        "accuracy": float((yhat == y).mean()) if len(y) else np.nan,
        "weighted_f1": float(skm.f1_score(y, yhat, average="weighted", labels=[0, 1], zero_division=0)),
        "balanced_accuracy": float(np.mean([tp / pos if pos else np.nan, tn / neg if neg else np.nan])),
        "sensitivity_all": tp / pos if pos else np.nan,
        "specificity_all": tn / neg if neg else np.nan,
    }
    both = pos > 0 and neg > 0
    out["roc_auc"] = float(skm.roc_auc_score(y, p)) if both else np.nan
    out["pr_auc"] = float(skm.average_precision_score(y, p)) if both else np.nan
    return out


def undefined_metrics(y: np.ndarray, where: str = "test split") -> dict[str, str]:
    """Which of `point_metrics`' figures the labels `y` (1 = all) cannot define, each with its reason in plain
    words ("undefined: test split has no hem cells"); empty when both classes are there.

    Weighted F1 is listed too: over one class it is that class's F1 alone, not the challenge's score."""
    pos, neg = int((np.asarray(y) == 1).sum()), int((np.asarray(y) == 0).sum())
    if pos and neg:
        return {}
    if not pos and not neg:
        return {k: f"undefined: {where} has no labelled cells" for k in (*BOTH_CLASSES, *RATE_OF.values(),
                                                                           "accuracy")}
    missing = "hem" if not neg else "all"
    reason = f"undefined: {where} has no {missing} cells"
    return {k: reason for k in (*BOTH_CLASSES, RATE_OF[missing])}


def undefined_of(result: dict[str, Any]) -> dict[str, str]:
    """A metrics.json's undefined figures with their reasons; for results written before they were recorded,
    derived from the class counts its provenance holds."""
    if "undefined" in result:
        return dict(result["undefined"])
    prov = result.get("provenance", {})
    by_class = prov.get("cells_by_class")
    if by_class is None:
        return {}
    y = np.array([1] * int(by_class.get("all", 0)) + [0] * int(by_class.get("hem", 0)))
    return undefined_metrics(y, _where(prov))


def _where(prov: dict[str, Any]) -> str:
    split = prov.get("split") or "evaluated"
    return "external set" if split == "external" else f"{split} split"


def metric_text(result: dict[str, Any], key: str, digits: int = 3) -> str:
    """A figure as shown: the number, or "undefined: <reason>" (never "nan")."""
    reason = undefined_of(result).get(key)
    if reason:
        return reason
    value = result.get("metrics", {}).get(key)
    if value is None or not np.isfinite(value):
        return "undefined: not computed"
    return f"{value:.{digits}f}"


def headline(result: dict[str, Any], digits: int = 3) -> str:
    """The run's headline score in words: "weighted F1 0.912 on the test split", or why there is none."""
    key, _ = HEADLINE
    prov = result.get("provenance", {})
    text = metric_text(result, key, digits)
    if text.startswith("undefined"):
        by_class = prov.get("cells_by_class", {})
        counts = f" ({int(by_class.get('all', 0))} all, {int(by_class.get('hem', 0))} hem cells)" if by_class else ""
        return (f"Weighted F1 undefined: {text.removeprefix('undefined: ')}{counts}. Cells of one class cannot "
                "show how well the two classes are told apart, so this run has no headline score.")
    return f"weighted F1 {text} on the {_where(prov)}"


def curves(preds: pd.DataFrame) -> dict[str, dict[str, list[float]]]:
    y, p, _ = _arrays(preds, 0.5)
    fpr, tpr, roc_thr = skm.roc_curve(y, p)
    prec, rec, pr_thr = skm.precision_recall_curve(y, p)
    return {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": np.nan_to_num(roc_thr, posinf=1.0).tolist()},
            "pr": {"precision": prec.tolist(), "recall": rec.tolist(), "threshold": pr_thr.tolist()}}


def bootstrap_by_subject(preds: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of `point_metrics`, resampling whole subjects with replacement."""
    y, p, _ = _arrays(preds, threshold)
    groups = preds["subject"].astype(object).where(preds["subject"].notna(), "cell:" + preds["path"].astype(str))
    codes, uniq = pd.factorize(groups)
    members = [np.flatnonzero(codes == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in pick])
        for k, v in point_metrics(y[idx], p[idx], threshold).items():
            samples.setdefault(k, []).append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))) if np.isfinite(v).any()
            else (np.nan, np.nan) for k, v in samples.items()}


def subject_readout(preds: pd.DataFrame, threshold: float = 0.5, blast_cutoff: float = 0.5) -> pd.DataFrame:
    """Per subject: cells, predicted blast fraction, cell-level accuracy and a call by the blast fraction.

    A subject is called `all` when at least `blast_cutoff` of its cells are predicted blasts; cells without a
    known subject are left out (they cannot be grouped).
    """
    df = preds[preds["subject"].notna()].copy()
    df["pred_all"] = df["prob_all"] >= threshold
    df["correct"] = df["pred_all"] == (df["label"] == "all") if "label" in df else np.nan
    g = df.groupby("subject", sort=True)
    out = pd.DataFrame({
        "cells": g.size(),
        "blast_fraction": g["pred_all"].mean(),
        "mean_prob_all": g["prob_all"].mean(),
    })
    if "label" in df and df["label"].notna().all():
        out["label"] = g["label"].agg(lambda s: s.mode().iloc[0])
        out["cell_accuracy"] = g["correct"].mean()
    out["call"] = np.where(out["blast_fraction"] >= blast_cutoff, "all", "hem")
    if "label" in out:
        out["call_correct"] = out["call"] == out["label"]
    return out.reset_index()


def error_tables(preds: pd.DataFrame, threshold: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """False positives (hem called all) and false negatives (all called hem), most confident mistakes first."""
    cols = [c for c in ("path", "subject", "label", "prob_all", "prob_all_calibrated", "split") if c in preds]
    pred_all = preds["prob_all"] >= threshold
    fp = preds[pred_all & (preds["label"] == "hem")][cols].sort_values("prob_all", ascending=False)
    fn = preds[~pred_all & (preds["label"] == "all")][cols].sort_values("prob_all", ascending=True)
    return fp.reset_index(drop=True), fn.reset_index(drop=True)


def evaluate_predictions(preds: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                         provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """All metrics of one predictions table, with the provenance of the data they came from.

    A figure the cells cannot define (one class only: specificity without normal cells, weighted F1 over a
    single class, ...) is NaN in `metrics` and its CI, and `undefined` holds the reason; `headline` is the
    challenge score in words, or why there is none."""
    y, p, _ = _arrays(preds, threshold)
    subjects = sorted(preds["subject"].dropna().astype(str).unique())
    table = report_table(preds, threshold)
    undefined = undefined_metrics(y, _where(provenance or {}))
    metrics = {k: (np.nan if k in undefined else v) for k, v in point_metrics(y, p, threshold).items()}
    ci = bootstrap_by_subject(preds, threshold, n_boot, seed) if n_boot else {}
    ci = {k: ((np.nan, np.nan) if k in undefined else v) for k, v in ci.items()}
    result = {
        "provenance": {**(provenance or {}), "cells": int(len(preds)), "subjects": subjects,
                       "cells_by_class": {k: int(v) for k, v in preds["label"].value_counts().items()}},
        "threshold": threshold,
        "challenge_metric": "weighted F1 (C-NMC 2019)",
        "metrics": metrics,  # NaN where undefined; `undefined` says why (`metric_text` shows it)
        "undefined": undefined,
        "ci95_by_subject_bootstrap": ci,
        "n_boot": n_boot,
        "confusion_matrix": {"rows_true": TARGET_NAMES, "cols_pred": TARGET_NAMES,
                             "counts": confusion(preds, threshold).tolist()},
        "report_table": table.reset_index(names="class").to_dict(orient="records"),
        "curves": curves(preds) if len(np.unique(y)) == 2 else {},
    }
    readout = subject_readout(preds, threshold)
    if len(readout) and "call_correct" in readout:
        result["subject_level"] = {"subjects": int(len(readout)), "accuracy": float(readout["call_correct"].mean()),
                                   "mean_cell_accuracy": float(readout["cell_accuracy"].mean())}
    result["headline"] = headline(result)
    return result


def report_view(result: dict[str, Any], digits: int = 4) -> pd.DataFrame:
    """The report's table as shown (text): a class without cells, and the averages over a one-class split,
    say "undefined" with the reason instead of the zeros or single-class numbers scikit-learn fills in."""
    table = pd.DataFrame(result["report_table"]).set_index("class")
    one_class = bool(undefined_of(result))
    out = pd.DataFrame(index=table.index, columns=table.columns, dtype=object)
    for row in table.index:
        for col in table.columns:
            v = table.loc[row, col]
            if col == "support":
                out.loc[row, col] = str(int(v))
            elif pd.isna(v):
                out.loc[row, col] = ""
            elif row in TARGET_NAMES and int(table.loc[row, "support"]) == 0:
                out.loc[row, col] = f"undefined: no {row.lower()} cells"
            elif one_class and row in ("macro avg", "weighted avg"):
                out.loc[row, col] = "undefined: one class only"
            else:
                out.loc[row, col] = f"{v:.{digits}f}"
    return out
