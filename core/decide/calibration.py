"""Calibration and the decision rule: reliability, ECE, Brier, temperature scaling, thresholds, review band.

The decision rule is fitted on the validation split and applied unchanged to test data and new cells:
temperature T rescales the logit of P(all); the threshold is 0.5 or the highest one reaching a target
sensitivity for `all` on validation (a missed blast costs more than a false alarm); cells whose calibrated
probability falls within `band` of the threshold are flagged "review manually".
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.atomic import atomic_write_text

_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-_logit(p) / temperature))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of the labels (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=float)
    z = _logit(p)

    def nll(log_t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / np.exp(log_t))), _EPS, 1 - _EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def reliability_curve(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Per equal-width probability bin: mean predicted P(all), observed fraction of blasts, count."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = bins == b
        rows.append({"bin": b, "lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(m.sum()),
                     "mean_predicted": float(p[m].mean()) if m.any() else np.nan,
                     "fraction_positive": float(y[m].mean()) if m.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    curve = reliability_curve(y, p, n_bins)
    used = curve[curve["count"] > 0]
    return float((used["count"] * (used["mean_predicted"] - used["fraction_positive"]).abs()).sum() / len(y))


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=float) - np.asarray(y, dtype=float)) ** 2))


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity for `all` on (y, p) is at least `target`."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    pos = np.sort(p[y == 1])
    if len(pos) == 0:
        raise ValueError("no blasts in the data: cannot choose a sensitivity threshold")
    k = int(np.floor((1 - target) * len(pos) + 1e-9))  # at most k positives may fall below the threshold
    return float(pos[min(k, len(pos) - 1)])


def subject_corrected(p: np.ndarray, subjects, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Pan et al. 2019's correction (the C-NMC winner): each cell's logit blended, with `weight`, with the mean
    logit of the same subject's *other* cells. Returns (corrected P(all), which cells were corrected): a cell
    with no subject id (None/NaN) or alone of its subject keeps its own probability.

    Why, and its limit: on C-NMC every subject is one class (a patient's cells are all blasts, a donor's all
    normal), so a subject's other cells are evidence about this one. In a real patient's blood blasts and normal
    cells mix, and the correction would pull a patient's normal cells toward blast: it is off unless asked for.
    """
    p = np.asarray(p, dtype=float)
    if not 0 <= weight <= 1:
        raise ValueError(f"subject correction weight must be in [0, 1], got {weight}")
    subj = pd.Series(list(subjects), dtype=object)
    if len(subj) != len(p):
        raise ValueError(f"{len(subj)} subject ids for {len(p)} probabilities")
    known = subj.notna().to_numpy() & ~np.isnan(p)
    if weight == 0 or not known.any():
        return p.copy(), np.zeros(len(p), bool)
    z = pd.Series(_logit(p[known]))
    g = subj[known].astype(str).reset_index(drop=True)
    total, count = z.groupby(g).transform("sum"), z.groupby(g).transform("count")
    others = ((total - z) / (count - 1).clip(lower=1)).to_numpy()
    alone = (count == 1).to_numpy()
    blended = np.where(alone, z, (1 - weight) * z + weight * others)
    out, done = p.copy(), np.zeros(len(p), bool)
    out[known] = 1 / (1 + np.exp(-blended))
    done[np.flatnonzero(known)[~alone]] = True
    return out, done


@dataclass
class DecisionRule:
    """How a probability becomes a call: temperature, threshold and the review band, fitted on validation;
    optionally first the per-subject correction (`subject_weight` > 0, applied where subject ids are known)."""

    temperature: float = 1.0
    threshold: float = 0.5
    band: float = 0.1
    fitted_on: str = "none (defaults)"
    target_sensitivity: float | None = None
    subject_weight: float = 0.0

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        return apply_temperature(p, self.temperature)

    def decide(self, p: np.ndarray, subjects=None) -> pd.DataFrame:
        """Per cell: calibrated probability, predicted class and the 'review manually' flag; with the subject
        correction on and `subjects` given, also whether the cell's call used its subject's other cells."""
        p = np.asarray(p, dtype=float)
        corrected = np.zeros(len(p), bool)
        if self.subject_weight and subjects is not None:
            p, corrected = subject_corrected(p, subjects, self.subject_weight)
        q = self.calibrate(p)
        out = pd.DataFrame({"prob_all_calibrated": q, "prediction": np.where(q >= self.threshold, "all", "hem"),
                            "uncertain": np.abs(q - self.threshold) < self.band})
        if self.subject_weight:
            out["subject_corrected"] = corrected
        return out

    @classmethod
    def fit(cls, y: np.ndarray, p: np.ndarray, target_sensitivity: float | None = None, band: float = 0.1,
            fitted_on: str = "validation split", subject_weight: float = 0.0, subjects=None) -> "DecisionRule":
        """Temperature (and threshold for a target sensitivity) fitted on the probabilities the rule will
        see: with `subject_weight`, the subject-corrected ones (`subjects` needed)."""
        p = np.asarray(p, dtype=float)
        if subject_weight:
            if subjects is None:
                raise ValueError("the subject correction needs the validation cells' subject ids")
            p, _ = subject_corrected(p, subjects, subject_weight)
            fitted_on += f"; subject correction weight {subject_weight:g}"
        t = fit_temperature(y, p)
        q = apply_temperature(p, t)
        thr = threshold_for_sensitivity(y, q, target_sensitivity) if target_sensitivity else 0.5
        return cls(t, thr, band, fitted_on, target_sensitivity, subject_weight)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DecisionRule":
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class CallRule:
    """How a field (or a patient's fields pooled) gets its call; the one place this rule lives.

    A cell is *judged* when the model gave it a class (blast or normal); review-band calls are judged with their
    class (and counted in `review`, so the why can ask for a look by eye); a cell the gate refused ("not
    assessed") or whose crop could not be read is not judged. Then, in this order:

    - `cannot judge`: no white cell found, or fewer than `min_judged` judged cells, or fewer than
      `min_judged_fraction` of the cells found judged (when the model cannot judge most of what is on the field,
      neither a blast nor the absence of one means much there);
    - `blasts`: at least `min_blasts` judged cells called blast with calibrated P(blast) at or above
      `min_blast_prob` (None: the model's own decision threshold, so every blast call counts), and they are at
      least `min_blast_fraction` of the judged cells (0: any share; a smear model fitted on photos of a few cells
      each may ask for a share, `field_rule.json`);
    - `no blasts`: otherwise.
    """

    min_blasts: int = 1
    min_blast_prob: float | None = None
    min_judged: int = 1
    min_judged_fraction: float = 0.5
    min_blast_fraction: float = 0.0

    def describe(self) -> str:
        """The rule in one sentence, for a caption or a CLI note."""
        bar = "" if self.min_blast_prob is None else f" with calibrated P(blast) ≥ {self.min_blast_prob:.2f}"
        share = f", at least {self.min_blast_fraction:.0%} of the judged cells" if self.min_blast_fraction else ""
        few = f"fewer than {self.min_judged} judged, " if self.min_judged > 1 else ""
        return (f"blasts: at least {self.min_blasts} judged cell{'s' if self.min_blasts > 1 else ''} called "
                f"blast{bar}{share}; cannot judge: no white cell, {few}or fewer than {self.min_judged_fraction:.0%} "
                "of the white cells found judged; otherwise no blasts")
