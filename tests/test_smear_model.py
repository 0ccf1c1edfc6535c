"""The smear model's learning on features made here: multiple-instance learning finds the blast in a bag, the
photo call from cell scores equals `core.smear.fields`' read-out, and the field rule is fitted to the labs' photos."""
from __future__ import annotations

import numpy as np
import pandas as pd

from training.smear_model import fit_field_rule, fit_mil, photo_calls


def _bags(rng, n_photos=40, d=16):
    """Certain negatives (no-blasts photos: 3 normal cells each) and bags (blasts photos: 1 blast + 2 normal
    cells, unlabelled); a blast's features are shifted along the first axis."""
    rows, feats = [], []
    for i in range(n_photos):
        blasts = i % 2 == 1
        for c in range(3):
            is_blast = blasts and c == 0
            x = rng.normal(0, 1, d)
            x[0] += 4.0 if is_blast else 0.0
            feats.append(x)
            rows.append({"photo": f"p{i}", "lab": "lab", "label": "" if blasts else "hem", "truth": is_blast})
    z = np.concatenate([np.array(feats), np.zeros((len(feats), 1))], axis=1)  # + the residual column
    return z, pd.DataFrame(rows)


def test_mil_finds_the_blast_in_each_bag():
    z, table = _bags(np.random.default_rng(0))
    lr, target = fit_mil(z, np.arange(len(table)), table)
    p = lr.probs(z)
    truth = table["truth"].to_numpy()
    assert (target[truth] == 1).all()  # every bag's blast ends as a positive
    assert (target[~truth & (table["label"] == "")] <= 0).mean() >= 0.9  # its normal cells mostly left out
    assert p[truth].min() > np.median(p[~truth])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(truth, p) > 0.95


def _oof(scores: dict[str, list[float]], judged: dict[str, list[bool]] | None = None) -> pd.DataFrame:
    rows = []
    for photo, ps in scores.items():
        for i, p in enumerate(ps):
            j = True if judged is None else judged[photo][i]
            rows.append({"photo": photo, "lab": "lab", "cell": i + 1, "p": p, "judged": j, "fold": 0,
                         "prediction": "all" if p >= 0.5 else "hem"})
    return pd.DataFrame(rows)


def test_photo_calls_are_the_read_outs_calls():
    from core.smear.fields import CallRule, field_readout

    scores = {"a": [0.9, 0.2], "b": [0.6, 0.7, 0.1], "c": [0.1, 0.2], "d": [0.95, 0.99, 0.3], "e": []}
    judged = {"a": [True, True], "b": [True, False, False], "c": [True, True], "d": [True, True, False], "e": []}
    oof = _oof(scores, judged)
    photos = pd.DataFrame({"photo": list(scores), "lab": "lab", "label": "blasts"})
    for t, k, f in [(0.5, 1, 0.0), (0.8, 1, 0.0), (0.5, 2, 0.0), (0.9, 2, 0.0), (0.5, 1, 0.6), (0.5, 1, 0.4)]:
        mine = photo_calls(oof, photos, t, k, f)
        cells = oof.assign(field=oof["photo"], prob_all_calibrated=oof["p"], uncertain=False, error=None,
                           ood_reason=np.where(oof["judged"], None, "unlike"))
        cells.loc[~oof["judged"], "prediction"] = None
        rule = CallRule(min_blasts=k, min_blast_prob=None if t <= 0.5 else t, min_blast_fraction=f)
        read = field_readout(cells, list(scores), {"e": "no white cells found"}, rule, pooled=False)
        assert list(mine) == list(read["call"]), (t, k, f)
        if f == 0.6:  # "a": 1 blast of 2 judged, under the share: said in the why
            assert read.loc[0, "call"] == "no blasts" and "50%, under the 60% share" in read.loc[0, "why"]


def test_field_rule_fitted_to_the_photos():
    """No-blasts photos here hold one stray high-scoring cell, blasts photos at least two: the fitted rule is not
    the most lenient one, and it calls every photo right."""
    rng = np.random.default_rng(1)
    scores, labels = {}, {}
    for i in range(20):
        blasts = i % 2 == 0
        ps = list(rng.uniform(0.0, 0.3, 4)) + ([0.8, 0.85] if blasts else [0.75])
        scores[f"p{i}"], labels[f"p{i}"] = ps, "blasts" if blasts else "no_blasts"
    oof = _oof(scores)
    photos = pd.DataFrame({"photo": list(scores), "lab": "lab", "label": [labels[p] for p in scores]})
    rule = fit_field_rule(oof, photos)
    calls = photo_calls(oof, photos, *rule)
    assert rule != (0.5, 1, 0.0)  # two cells, a higher bar or a share (2 of 6 vs 1 of 5) separate them
    assert list(calls) == ["blasts" if labels[p] == "blasts" else "no blasts" for p in scores]


def test_head_weights_balance_classes_then_labs():
    """Each class weighs half, and within a class each lab the same: a lab of 900 cells does not drown one of 30."""
    from training.smear_model import sample_weights

    y = np.array([0] * 900 + [1] * 100 + [0] * 30)
    labs = np.array(["big"] * 1000 + ["small"] * 30)
    w = sample_weights(y, labs)
    assert np.isclose(w[y == 1].sum(), w[y == 0].sum()) and np.isclose(w.sum(), len(y))
    assert np.isclose(w[(y == 0) & (labs == "big")].sum(), w[(y == 0) & (labs == "small")].sum())
    plain = sample_weights(y)  # without labs: sklearn's "balanced" class weights
    assert np.allclose(plain, len(y) / (2 * np.bincount(y)[y]))


def test_the_head_written_into_the_network_computes_the_same_probabilities():
    """The head's standardisation is folded into the `hidden` layer's weights: the network's Dense layers give
    exactly the fitted head's P(blast), and reading them back gives the same head."""
    import keras
    from keras import layers

    from training.smear_model import Head, fit_head

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(3, 2, (200, 8)), rng.uniform(0, 9, (200, 1))], axis=1)
    y = (z[:, 0] + rng.normal(0, 1, 200) > 3).astype(int)
    head = fit_head(z, y)
    inp = keras.Input((9,))
    out = layers.Dense(2, activation="softmax", name="probabilities")(
        layers.Dense(head.w1.shape[1], activation="relu", name="hidden")(inp))
    net = keras.Model(inp, out)
    head.write(net)
    got = np.asarray(net.predict(z.astype("float32"), verbose=0))[:, 1]
    assert np.allclose(got, head.probs(z), atol=1e-4)
    back = Head.of_network(net)
    assert np.allclose(back.probs(z), head.probs(z), atol=1e-5)
    z2 = z.copy()
    z2[:, -1] += 1000  # the subspace distance has no say in the call
    assert np.allclose(head.probs(z2), head.probs(z))


def test_training_cells_round_trip_small_and_close(tmp_path):
    """A folder keeps its training cells' components as int8 with a scale per component: back within half a
    step of each component's range, the bag cells left out are not kept, labels from the final targets."""
    from training.smear_model import ZSet, _save_training_cells, load_training_cells

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 5, (50, 128)), rng.uniform(100, 900, (50, 1))], axis=1)
    table = pd.DataFrame({"photo": [f"p{i}" for i in range(50)], "lab": "x", "label": ""})
    target = np.array([1, 0, -1, 0, 1] * 10)
    _save_training_cells(tmp_path / "training_cells.npz", ZSet(z, np.arange(50), np.zeros(50, int), table), target)
    back = load_training_cells(tmp_path)
    keep = target >= 0
    step = np.abs(z[keep, :-1]).max(0) / 127
    assert len(back.table) == keep.sum() and list(back.table["label"][:2]) == ["all", "hem"]
    assert (np.abs(back.z[:, :-1] - z[keep, :-1]) <= step / 2 + 1e-9).all()
    assert np.allclose(back.z[:, -1], z[keep, -1], rtol=1e-3)
