"""Model folders (inference-only model + decision rule + card), the shipped starter model, and the real-cell
benchmark's refusal of data it cannot cross-validate."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.nets.augmentation import AugmentSpec  # noqa: E402
from core.decide.calibration import DecisionRule  # noqa: E402
from core.decide.model_folder import STARTER_DIR, is_model_folder, load_model_folder, save_model_folder  # noqa: E402
from core.nets.models import create_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _bench_real():
    spec = importlib.util.spec_from_file_location("bench_real", REPO / "benchmarks" / "bench_real.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_folder_is_inference_only_and_keeps_rule_and_card(tmp_path):
    spec = AugmentSpec(hed_sigma=0.05, brightness=0.1, salt_pepper=0.01)
    model = create_model("solution_a", 32, mean=(0.3, 0.2, 0.4), augment=spec, standardize=True,
                         filters=(4, 4, 8, 8))
    rule = DecisionRule(temperature=1.7, threshold=0.4, band=0.05, fitted_on="test rule")
    folder = save_model_folder(tmp_path / "m", model, rule, {"name": "tiny"}, "# card\n")
    assert is_model_folder(folder) and not is_model_folder(tmp_path)
    mf = load_model_folder(folder)
    names = {l.name for l in mf.model.layers}
    assert "augmentation" not in names and "cell_standardize" in names
    assert mf.rule == rule and mf.card == {"name": "tiny"} and mf.size == 32 and mf.card_markdown == "# card\n"
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    np.testing.assert_allclose(mf.model.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="model.keras"):
        load_model_folder(tmp_path / "nothing")


def test_an_ensemble_folder_averages_its_members_everywhere(tmp_path, cell_dir):
    """Members travel in one folder (model.keras + member-N.keras); predict, evaluate, Grad-CAM and export all
    use the members' mean, and re-writing the folder with fewer members leaves no stale one."""
    from core.nets.explain import EnsembleCAM, gradcam_for
    from core.nets.export import portable_ensemble
    from core.decide.inference import predict_proba
    from training.cli import main

    members = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        members.append(create_model("solution_a", 32, mean=(0.3, 0.2, 0.4), augment=AugmentSpec(),
                                    standardize=True, filters=(4, 4, 4, 4)))
    folder = save_model_folder(tmp_path / "e", members[0], DecisionRule(fitted_on="unit test"), {"name": "e"}, "",
                               members=members[1:])
    assert sorted(p.name for p in folder.glob("*.keras")) == ["member-1.keras", "member-2.keras", "model.keras"]
    mf = load_model_folder(folder)
    assert len(mf.models) == 3 and mf.model is mf.models[0]
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype("uint8")
    singles = np.stack([m.predict(x, verbose=0)[:, 1] for m in members])
    assert singles.std(axis=0).max() > 1e-4  # the members differ, so the mean is not any one of them
    np.testing.assert_allclose(predict_proba(mf.models, x), singles.mean(0), atol=1e-5)
    np.testing.assert_allclose(portable_ensemble(mf.models).predict(x.astype("float32"), verbose=0)[:, 1],
                               singles.mean(0), atol=1e-5)
    cam = gradcam_for(mf.models)
    assert isinstance(cam, EnsembleCAM)
    probs, maps = cam(x)
    np.testing.assert_allclose(probs[:, 1], singles.mean(0), atol=1e-5)
    assert maps.shape == (5, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    out = tmp_path / "pred.csv"
    assert main(["predict", str(folder), str(cell_dir), "--out", str(out), "--runs-dir", str(tmp_path / "r")]) == 0
    import pandas as pd

    from core.image.preprocessing import load_crop

    table = pd.read_csv(out)
    crops = np.stack([load_crop(p, size=32) for p in table["path"]])
    np.testing.assert_allclose(table["prob_all"], predict_proba(members, crops), atol=1e-5)
    # the audit trail names the whole ensemble: a digest of every member file, not of model.keras alone
    import hashlib

    from training.store import RunStore

    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    lines = "".join(f"{n} {sha((folder / n).read_bytes())}\n" for n in ("model.keras", "member-1.keras",
                                                                          "member-2.keras"))
    trail = RunStore(tmp_path / "r").classifications()
    assert set(trail["model_sha256"]) == {sha(lines.encode())}
    save_model_folder(folder, members[0], DecisionRule(), {"name": "e"}, "", members=members[1:2])
    assert len(load_model_folder(folder).models) == 2 and not (folder / "member-2.keras").exists()


def test_a_quantized_folder_stores_int8_dense_kernels_and_exports_what_it_computes(tmp_path):
    """`save_model_folder(quantize="int8")`: every member's dense kernels are int8 in the files, the folder's
    mean stays the float members' (to the kernels' rounding), and the exported float model computes exactly
    what the quantised folder computes (export's contract: equal to 1e-4)."""
    from core.nets.export import portable_ensemble
    from core.decide.inference import predict_proba

    members = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        members.append(create_model("solution_a", 32, mean=(0.3, 0.2, 0.4), augment=AugmentSpec(),
                                    standardize=True, filters=(4, 4, 8, 8)))
    folder = save_model_folder(tmp_path / "q", members[0], DecisionRule(), {"name": "q"}, "", members=members[1:],
                               quantize="int8")
    mf = load_model_folder(folder)
    for m in mf.models:
        dense = [l for l in m.layers if isinstance(l, keras.layers.Dense)]
        assert dense and all(l.quantization_mode == "int8" for l in dense)
    x = np.random.default_rng(4).integers(0, 256, (6, 32, 32, 3)).astype("uint8")
    p = predict_proba(mf.models, x)
    np.testing.assert_allclose(p, predict_proba(members, x), atol=5e-3)
    np.testing.assert_allclose(portable_ensemble(mf.models).predict(x.astype("float32"), verbose=0)[:, 1], p,
                               atol=1e-5)


def test_cli_predicts_and_evaluates_with_a_model_folder(tmp_path, cell_dir, capsys):
    from training.cli import main

    model = create_model("solution_a", 32, augment=AugmentSpec(), standardize=True, filters=(4, 4, 4, 4))
    folder = save_model_folder(tmp_path / "m", model, DecisionRule(fitted_on="unit test"), {"name": "t"}, "")
    cells = cell_dir
    out = tmp_path / "pred.csv"
    runs = tmp_path / "runs"
    assert main(["predict", str(folder), str(cells), "--out", str(out), "--runs-dir", str(runs)]) == 0
    import hashlib

    import pandas as pd

    from training.store import RunStore

    table = pd.read_csv(out)
    assert len(table) == 7 and table["prob_all"].between(0, 1).all()
    assert {"out_of_distribution", "ood_reason"} <= set(table.columns)
    trail = RunStore(runs).classifications()  # the CLI's classifications are audited too
    assert len(trail) == 7 and set(trail["source"]) == {"cli predict"}
    first = sorted(cells.glob("*.bmp"))[0]
    row = trail.set_index("file_name").loc[first.name]
    assert row["file_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert row["model_sha256"] == hashlib.sha256((folder / "model.keras").read_bytes()).hexdigest()
    assert "fitted on unit test" in row["rule"]
    assert main(["audit", "--out", str(tmp_path / "trail.csv"), "--runs-dir", str(runs)]) == 0
    assert len(pd.read_csv(tmp_path / "trail.csv")) == 7
    ev = tmp_path / "ev"
    assert main(["evaluate", str(folder), "--data", str(cells), "--n-boot", "20", "--out", str(ev),
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["provenance"]["cells"] == 7 and "not refitted" in metrics["provenance"]["rule"]
    assert main(["evaluate", str(folder)]) == 2  # a model folder needs --data
    assert "--data" in capsys.readouterr().err


@pytest.mark.skipif(not (STARTER_DIR / "model.keras").exists(), reason="no shipped starter model in models/")
def test_starter_loads_in_safe_mode_and_classifies_real_sample_cells(samples_dir):
    from core.decide.inference import classify_files, collect_images

    assert (STARTER_DIR / "model.keras").stat().st_size <= 10e6
    assert all(p.stat().st_size <= 10e6 for p in STARTER_DIR.glob("member-*.keras"))  # an ensemble's members
    mf = load_model_folder("starter")
    assert not any(l.name == "augmentation" for m in mf.models for l in m.layers)
    assert mf.card["research_use_only"] and mf.card["data"]["subjects"] >= 10
    assert "leave-subjects-out" in mf.rule.fitted_on
    for part in ("Research use only", "Known limits", "C-NMC 2019", "leave-subjects-out"):
        assert part.lower() in mf.card_markdown.lower(), part
    paths = collect_images([samples_dir / "training_like"])
    table = classify_files(mf.models, paths, mf.size, rule=mf.rule)
    assert table["error"].isna().all() and table["prob_all_calibrated"].between(0, 1).all()
    truth = table["path"].str.contains("_all").map({True: "all", False: "hem"})
    print(f"starter on the {len(table)} real sample cells: accuracy {(table['prediction'] == truth).mean():.3f} "
          "(reported, not asserted: 7 cells)")


def test_bench_real_refuses_folders_it_cannot_cross_validate(tmp_path, cell_dir, capsys):
    bench = _bench_real()
    assert bench.main([str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no cells here")
    assert bench.main([str(empty)]) == 2
    assert "no labelled cells" in capsys.readouterr().err
    one = tmp_path / "one" / "all"
    one.mkdir(parents=True)
    for p in (cell_dir).glob("*_all.bmp"):
        shutil.copy(p, one / p.name)
    assert bench.main([str(tmp_path / "one")]) == 2
    assert "only one class" in capsys.readouterr().err
    assert bench.main([str(cell_dir), "--recipes", "nope"]) == 2


def test_paired_difference_and_subject_correction():
    import pandas as pd

    bench = _bench_real()
    df = pd.DataFrame({"subject": ["a", "a", "b", "b", "c", "c"], "label": ["all", "all", "hem", "hem", "all", "all"],
                       "prob_all": [0.9, 0.4, 0.2, 0.6, 0.7, 0.8]})
    same = bench.paired_difference(df, df, n_boot=50)
    assert same["weighted_f1"]["difference"] == 0 and same["weighted_f1"]["ci95"] == (0.0, 0.0)
    fixed = bench.subject_corrected(df, weight=0.5)
    # cell 2 of subject a: logit(0.4) averaged with logit(0.9) -> p = sigmoid((logit .4 + logit .9) / 2)
    lg = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert fixed["prob_all"].iloc[1] == pytest.approx(1 / (1 + np.exp(-(lg(0.4) + lg(0.9)) / 2)))


def test_bench_real_cross_validates_end_to_end(tmp_path, synth_small):
    """A tiny budget on generated cells: every cell predicted once, by a model that never saw its subject; the
    baseline and the recipe scored pooled and per fold; the numbers written are those of the predictions."""
    import json

    import pandas as pd
    from sklearn.metrics import f1_score

    bench = _bench_real()
    out = tmp_path / "bench"
    assert bench.main([str(synth_small / "C-NMC_Leukemia" / "training_data"), "--recipes", "report", "--size", "32",
                       "--per-class", "16", "--epochs", "1", "--batch", "16", "--feature-size", "32",
                       "--n-boot", "20", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert oof["path"].is_unique and set(oof["fold"]) == {0, 1, 2}
    assert oof.groupby("subject")["fold"].nunique().max() == 1  # a subject is tested in one fold only
    for _, part in oof.groupby("fold"):
        assert set(part["label"]) == {"all", "hem"}  # both classes among every fold's unseen subjects
    assert oof[["baseline", "report"]].notna().all().all()
    results = json.loads((out / "results.json").read_text())
    y = (oof["label"] == "all").astype(int)
    for method in ("baseline", "report"):
        pooled = results["methods"][method]["pooled"]
        want = f1_score(y, (oof[method] >= 0.5).astype(int), average="weighted")
        assert pooled["weighted_f1"] == pytest.approx(want, abs=1e-9)
