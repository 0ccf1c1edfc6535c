"""Metrics and calibration against hand-computed values (as MONAI's tests do)."""
import numpy as np
import pandas as pd
import pytest

from core.decide import calibration as cal
from core.decide.metrics import (bootstrap_by_subject, confusion, error_tables, evaluate_predictions, point_metrics,
                          report_table, subject_readout)


@pytest.fixture()
def five():
    return pd.DataFrame({"path": list("abcde"), "subject": ["1", "1", "H1", "H2", "2"],
                         "label": ["all", "all", "hem", "hem", "all"], "prob_all": [0.9, 0.4, 0.6, 0.1, 0.8]})


def test_point_metrics_hand_computed(five):
    y = (five["label"] == "all").to_numpy().astype(int)
    m = point_metrics(y, five["prob_all"].to_numpy())
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity_all"] == pytest.approx(2 / 3) and m["specificity_all"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["weighted_f1"] == pytest.approx(0.6)  # (3 * 2/3 + 2 * 1/2) / 5
    assert m["roc_auc"] == pytest.approx(5 / 6)
    np.testing.assert_array_equal(confusion(five), [[1, 1], [1, 2]])


def test_report_table_layout(five):
    t = report_table(five)
    assert list(t.index) == ["Hem", "All", "accuracy", "macro avg", "weighted avg"]
    assert t.loc["All", "support"] == 3 and t.loc["Hem", "support"] == 2
    assert t.loc["All", "precision"] == pytest.approx(2 / 3) and t.loc["Hem", "recall"] == pytest.approx(1 / 2)
    assert t.loc["accuracy", "f1-score"] == pytest.approx(0.6)
    assert t.loc["weighted avg", "f1-score"] == pytest.approx(0.6)


def test_subject_bootstrap_is_wider_than_cell_bootstrap():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(12):  # subjects are either easy (all right) or hard (half wrong): correlated cells
        label = "all" if s % 2 else "hem"
        hard = s % 3 == 0
        for c in range(25):
            right = (not hard) or c % 2 == 0
            p = 0.9 if (label == "all") == right else 0.1
            rows.append({"path": f"{s}/{c}", "subject": f"S{s}", "label": label, "prob_all": p})
    df = pd.DataFrame(rows)
    by_subject = bootstrap_by_subject(df, n_boot=300, seed=1)["accuracy"]
    by_cell = bootstrap_by_subject(df.assign(subject=None), n_boot=300, seed=1)["accuracy"]
    point = point_metrics((df["label"] == "all").to_numpy().astype(int), df["prob_all"].to_numpy())["accuracy"]
    assert by_subject[0] <= point <= by_subject[1]
    assert (by_subject[1] - by_subject[0]) > 1.5 * (by_cell[1] - by_cell[0])
    del rng


def test_subject_readout_and_errors(five):
    r = subject_readout(five).set_index("subject")
    assert r.loc["1", "cells"] == 2 and r.loc["1", "blast_fraction"] == 0.5 and r.loc["1", "call"] == "all"
    assert r.loc["H1", "call"] == "all" and not r.loc["H1", "call_correct"]
    assert r.loc["1", "cell_accuracy"] == 0.5
    fp, fn = error_tables(five)
    assert fp["path"].tolist() == ["c"] and fn["path"].tolist() == ["b"]


def test_evaluate_predictions_records_provenance(five):
    out = evaluate_predictions(five, n_boot=20, provenance={"split": "test", "runs": ["r1"]})
    assert out["provenance"]["split"] == "test" and out["provenance"]["cells"] == 5
    assert out["provenance"]["subjects"] == ["1", "2", "H1", "H2"]
    assert out["challenge_metric"].startswith("weighted F1")
    assert set(out["ci95_by_subject_bootstrap"]) >= {"weighted_f1", "balanced_accuracy"}


def test_brier_ece_hand_computed():
    assert cal.brier_score(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(0.1)
    y = np.array([1, 0, 1, 1])
    p = np.array([0.15, 0.15, 0.85, 0.85])  # bin 1: mean .15, frac .5; bin 8: mean .85, frac 1
    assert cal.expected_calibration_error(y, p) == pytest.approx((2 * 0.35 + 2 * 0.15) / 4)


def test_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-z))).astype(int)
    p = 1 / (1 + np.exp(-3 * z))  # three times too confident
    t = cal.fit_temperature(y, p)
    assert abs(t - 3) < 0.3
    assert cal.expected_calibration_error(y, cal.apply_temperature(p, t)) < cal.expected_calibration_error(y, p)


def test_threshold_for_sensitivity_and_review_band():
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.2, 0.5, 0.7, 0.9, 0.1, 0.3])
    thr = cal.threshold_for_sensitivity(y, p, 0.75)
    assert thr == 0.5 and ((p >= thr) & (y == 1)).sum() / 4 >= 0.75
    rule = cal.DecisionRule(temperature=1.0, threshold=0.5, band=0.1)
    d = rule.decide(np.array([0.55, 0.95, 0.3]))
    assert d["uncertain"].tolist() == [True, False, False]
    assert d["prediction"].tolist() == ["all", "all", "hem"]


def test_decision_rule_roundtrip(tmp_path):
    rule = cal.DecisionRule(1.7, 0.31, 0.05, "validation split", 0.95)
    rule.save(tmp_path / "c.json")
    assert cal.DecisionRule.load(tmp_path / "c.json") == rule


def test_subject_correction_hand_computed():
    """Each cell's logit blended with the mean logit of its subject's *other* cells; cells without a subject id
    or alone of theirs keep their probability; weight 1 is the others' mean alone."""
    lg = lambda p: np.log(p / (1 - p))  # noqa: E731
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    p = np.array([0.9, 0.4, 0.7, 0.2, 0.6, 0.3])
    subjects = ["a", "a", "a", None, "b", "c"]
    out, done = cal.subject_corrected(p, subjects, 0.25)
    others0 = (lg(0.4) + lg(0.7)) / 2
    assert out[0] == pytest.approx(sig(0.75 * lg(0.9) + 0.25 * others0))
    assert out[1] == pytest.approx(sig(0.75 * lg(0.4) + 0.25 * (lg(0.9) + lg(0.7)) / 2))
    np.testing.assert_allclose(out[3:], p[3:])  # no id, alone, alone
    assert done.tolist() == [True, True, True, False, False, False]
    full, _ = cal.subject_corrected(p, subjects, 1.0)
    assert full[2] == pytest.approx(sig((lg(0.9) + lg(0.4)) / 2))
    same, none = cal.subject_corrected(p, subjects, 0.0)
    np.testing.assert_allclose(same, p)
    assert not none.any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cal.subject_corrected(p, subjects, 1.5)
    with pytest.raises(ValueError, match="subject ids"):
        cal.subject_corrected(p, subjects[:3], 0.5)


def test_decision_rule_with_subject_correction(tmp_path):
    """Fitted on the corrected probabilities it will see; decides with them where subjects are given and says
    which cells were corrected; kept through save/load; a rule file from before the option loads as off."""
    rng = np.random.default_rng(0)
    subjects = np.repeat(["p1", "p2", "h1", "h2"], 25)
    y = np.repeat([1, 1, 0, 0], 25)
    p = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, 100), 0.01, 0.99)
    rule = cal.DecisionRule.fit(y, p, subject_weight=0.5, subjects=subjects, fitted_on="val")
    corrected, _ = cal.subject_corrected(p, subjects, 0.5)
    assert rule.subject_weight == 0.5 and "subject correction weight 0.5" in rule.fitted_on
    assert rule.temperature == pytest.approx(cal.fit_temperature(y, corrected))
    d = rule.decide(p, subjects=subjects)
    np.testing.assert_allclose(d["prob_all_calibrated"], cal.apply_temperature(corrected, rule.temperature))
    assert d["subject_corrected"].all()
    plain = cal.DecisionRule(temperature=rule.temperature)
    assert (d["prediction"] == np.where(y, "all", "hem")).mean() > \
        (plain.decide(p)["prediction"] == np.where(y, "all", "hem")).mean()  # one class per subject: it helps
    assert not rule.decide(p)["subject_corrected"].any()  # no subjects given: the cell's own call
    rule.save(tmp_path / "r.json")
    assert cal.DecisionRule.load(tmp_path / "r.json") == rule
    (tmp_path / "old.json").write_text('{"temperature": 1.2, "threshold": 0.5, "band": 0.1, "fitted_on": "x", '
                                       '"target_sensitivity": null}')
    old = cal.DecisionRule.load(tmp_path / "old.json")
    assert old.subject_weight == 0 and "subject_corrected" not in old.decide(p, subjects=subjects)
    with pytest.raises(ValueError, match="subject ids"):
        cal.DecisionRule.fit(y, p, subject_weight=0.5)
