import numpy as np
import pandas as pd
import pytest

from core.data.dataset import index, parse_uid
from core.data.imageio import read_image
from core.data.synthetic import Stain, default_plan, morphology, render_cell, replica_plan, synthesize


def test_synthetic_tiles_look_like_cnmc(synth_small):
    m, _ = index(synth_small)
    sizes = set(m["size"])
    assert sizes == {608454, 608538}  # both BMP header variants, as in the real data
    img = read_image(m["path"].iloc[0])
    assert img.shape == (450, 450, 3)
    cell = img.sum(-1) > 0
    assert 0.08 < cell.mean() < 0.4  # one cell on a black background
    assert (img[0, 0] == 0).all() and (img[-1, -1] == 0).all()
    r, g, b = img[cell].mean(0)
    assert b > r > g  # violet/purple stain


def _features(label, difficulty, n=12, seed=0):
    rng = np.random.default_rng(seed)
    st = Stain((1.0, 1.0, 1.0), 1.0, 0.0)
    out = []
    for _ in range(n):
        t, _ = morphology(label, rng, difficulty, 0.0)
        img = render_cell(t, st, rng).astype(float)
        cell = img.sum(-1) > 0
        out.append((cell.sum(), img[cell][:, 0].std()))
    return np.array(out)


def test_classes_differ_in_size_and_texture():
    hem, blast = _features("hem", 0.0), _features("all", 0.0)
    assert blast[:, 0].mean() > hem[:, 0].mean() * 1.15  # larger cells
    assert blast[:, 1].mean() > hem[:, 1].mean() * 1.2  # coarser, more contrasted chromatin


def test_difficulty_one_makes_classes_identical_in_distribution():
    rng = np.random.default_rng(0)
    ts = [[morphology(lab, rng, 1.0, 0.0)[0] for _ in range(4000)] for lab in ("hem", "all")]
    assert abs(np.mean(ts[0]) - np.mean(ts[1])) < 0.01


def test_label_noise_rate():
    rng = np.random.default_rng(1)
    flips = [morphology("all", rng, 0.3, 0.2)[1] for _ in range(5000)]
    assert abs(np.mean(flips) - 0.2) < 0.02


def test_subjects_have_distinct_stains():
    a, b = Stain.for_subject("H1", 0), Stain.for_subject("7", 0)
    assert a != b and a == Stain.for_subject("H1", 0)


def test_deterministic_bytes(tmp_path):
    specs, rows = default_plan(2, all_subjects=3, hem_subjects=3, prelim_subjects=2, final_subjects=1)
    from core.data.synthetic import write_dataset

    write_dataset(tmp_path / "a", specs[:5], rows, seed=5, workers=1, progress=False)
    write_dataset(tmp_path / "b", specs[:5], rows, seed=5, workers=2, progress=False)
    for s in specs[:5]:
        assert (tmp_path / "a" / s.relpath).read_bytes() == (tmp_path / "b" / s.relpath).read_bytes()


def test_replica_plan_full_matches_real_tree(file_list):
    specs, rows = replica_plan(file_list, 1.0)
    real = {ln.strip() for ln in file_list.read_text().splitlines() if ln.strip().endswith(".bmp")}
    assert {s.relpath for s in specs} == real and len(specs) == 15114
    assert len(rows) == 1867
    train = [s for s in specs if "training_data" in s.relpath]
    assert len({s.subject for s in train if s.label == "all"}) == 47
    assert len({s.subject for s in train if s.label == "hem"}) == 26


def test_replica_small_keeps_structure(replica_small, file_list):
    m, p = index(replica_small)
    assert p.empty
    train = m[m["source"].str.startswith("fold_")]
    real_subjects = {parse_uid(ln.rsplit("/", 1)[1]).subject for ln in file_list.read_text().splitlines()
                     if "training_data" in ln}
    assert set(train["subject"]) == real_subjects  # every subject survives scaling
    per_fold = train.groupby(["source", "label"]).size()
    assert per_fold[("fold_0", "all")] > per_fold[("fold_0", "hem")]  # the real class imbalance is kept
    truth = pd.read_csv(replica_small / "synthetic_truth.csv")
    assert len(truth) == len(m)
    assert "UID_h" in " ".join(train["name"])  # the lower-case h names of the real tree are reproduced


def test_cli_synth(tmp_path, capsys):
    from training.cli import main

    assert main(["synth", str(tmp_path / "d"), "--cells-per-subject", "1", "--noise", "0.1", "--workers", "2"]) == 0
    assert "best achievable accuracy ~0.900" in capsys.readouterr().out
    m, p = index(tmp_path / "d")
    assert len(m) > 20 and p.empty


@pytest.mark.slow
def test_batch_effect_makes_leaky_splits_score_higher(tmp_path):
    """With weak morphology (difficulty 0.9), per-subject stain lets a model that has seen a subject recognise
    its cells: a 1-NN on colour/texture features scores far higher on the leaky image-level split than on the
    subject-disjoint one, as on real C-NMC data."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    from core.image.preprocessing import load_crop
    from core.data.splits import make_split

    synthesize(tmp_path, cells_per_subject=12, difficulty=0.9, seed=2, workers=2, progress=False)
    m, _ = index(tmp_path)

    def feats(p):
        c = load_crop(p, 64).astype(float)
        mask = c.sum(-1) > 0
        return np.r_[c[mask].mean(0), c[mask].std(0), mask.mean()]

    f = {p: feats(p) for p in m.loc[m["label"].notna(), "path"]}
    score = {}
    for strategy in ("image", "patient"):
        accs = []
        for seed in range(5):
            s = make_split(m, strategy, seed=seed)
            tr, te = s[s["split"] == "train"], s[s["split"] == "test"]
            scaler = StandardScaler().fit(np.stack([f[p] for p in tr["path"]]))
            knn = KNeighborsClassifier(1).fit(scaler.transform(np.stack([f[p] for p in tr["path"]])), tr["label"])
            accs.append((knn.predict(scaler.transform(np.stack([f[p] for p in te["path"]]))) == te["label"]).mean())
        score[strategy] = float(np.mean(accs))
    assert score["image"] > score["patient"] + 0.15, score
