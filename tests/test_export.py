"""Export: inference-only models that load outside this project (plain Keras, SavedModel, ONNX) and give the
project's probabilities."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.nets.augmentation import AugmentSpec  # noqa: E402
from core.decide.calibration import DecisionRule  # noqa: E402
from core.nets.export import builtin_cell_standardize, export_model, portable_model  # noqa: E402
from core.nets.models import create_model, list_models  # noqa: E402
from core.image.preprocessing import load_crop  # noqa: E402
from core.nets.stain_layers import CellStandardize  # noqa: E402

SIZE = 32


def _plain_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that cannot import this project (cwd elsewhere, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    guard = ("import sys\nassert not any(m.split('.')[0] in ('core', 'training', 'dashboard') "
             "for m in sys.modules)\n")
    return subprocess.run([sys.executable, "-c", code + "\n" + guard], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_builtin_cell_standardize_matches_the_layer():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, SIZE, SIZE, 3)).astype("float32")
    x[:, :10] = 0  # background rows
    x[1, 12:20] = 10  # exactly the background level: background
    x[2, 12:20] = [11, 0, 0]  # one channel above it: foreground
    x[3] = 0  # an empty image stays black
    x[4, :, :, 2] = 200  # a constant channel: zero variance
    ref = np.asarray(CellStandardize()(x))
    got = np.asarray(builtin_cell_standardize(SIZE)(x))
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert not got[3].any()
    assert (got[1, 12:20] == 0).all() and (got[2, 12:20] != 0).any()


@pytest.mark.parametrize("name", list_models())
def test_portable_model_has_builtin_layers_only_and_same_outputs(name):
    model = create_model(name, SIZE, mean=(0.3, 0.25, 0.35), augment=AugmentSpec(hed_sigma=0.05, noise_std=4.0),
                         standardize=True, seed=0)
    port = portable_model(model)
    modules = {type(layer).__module__.split(".")[0] for layer in port._flatten_layers()}
    assert modules == {"keras"}
    x = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3)).astype("float32")
    x[:, :6] = 0
    np.testing.assert_allclose(port.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)


@pytest.fixture(scope="module")
def starter_exports(tmp_path_factory, cell_dir):
    """The shipped starter exported in every format, with the project's own probabilities on the sample cells
    (the real C-NMC samples where present)."""
    from core.decide.model_folder import load_model_folder

    mf = load_model_folder("starter")
    crops = np.stack([load_crop(p, size=mf.size) for p in sorted(cell_dir.glob("*.bmp"))]).astype("float32")
    out = tmp_path_factory.mktemp("exports")
    paths = {fmt: export_model(mf.models, fmt, out / fmt, mf.rule, 100, "starter")
             for fmt in ("keras", "savedmodel", "onnx")}
    np.save(out / "crops.npy", crops)
    # the project's P(hem), P(all): the mean over the folder's members (one, or an ensemble's)
    np.save(out / "ref.npy", np.mean([m.predict(crops, verbose=0) for m in mf.models], axis=0))
    return out, paths, mf


def _max_diff_outside(out: Path, imports: str, load: str, predict: str) -> float:
    """Largest |P - project's P| over the sample crops, computed in a fresh interpreter that cannot import the
    project: `load` makes the model `m` from the exported file, `predict` is an expression of `m` and crops `c`."""
    r = _plain_python(
        f"import sys, numpy as np, {imports}\n{load}\n"
        f"c, ref = np.load({str(out / 'crops.npy')!r}), np.load({str(out / 'ref.npy')!r})\n"
        f"p = {predict}\n"
        "print('diff', float(np.abs(p - ref).max()))\n", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split("diff")[-1])


def test_exported_keras_loads_with_plain_keras(starter_exports):
    out, paths, _ = starter_exports
    diff = _max_diff_outside(out, "keras", f"m = keras.saving.load_model({str(paths['keras'])!r})",
                             "m.predict(c, verbose=0)")
    assert diff <= 1e-4


def test_exported_onnx_runs_in_onnxruntime_alone(starter_exports):
    out, paths, _ = starter_exports
    diff = _max_diff_outside(
        out, "onnxruntime as ort",
        f"m = ort.InferenceSession({str(paths['onnx'])!r}, providers=['CPUExecutionProvider'])",
        "m.run(None, {m.get_inputs()[0].name: c})[0]\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules")
    assert diff <= 1e-4


def test_exported_savedmodel_serves_the_same_probabilities(starter_exports):
    out, paths, _ = starter_exports
    diff = _max_diff_outside(out, "tensorflow as tf", f"m = tf.saved_model.load({str(paths['savedmodel'])!r})",
                             "m.serve(c).numpy()")
    assert diff <= 1e-4


def test_contract_states_crop_size_and_the_rule_in_force(starter_exports):
    out, _, mf = starter_exports
    c = json.loads((out / "onnx" / "contract.json").read_text())
    assert c["input"]["shape"] == [None, mf.size, mf.size, 3] and c["crop"]["size"] == mf.size
    assert c["crop"]["margin"] == 100 and c["output"]["classes"] == ["hem", "all"]
    assert c["decision_rule"]["temperature"] == pytest.approx(mf.rule.temperature)
    assert c["decision_rule"]["threshold"] == pytest.approx(mf.rule.threshold)
    # The rule as the contract writes it reproduces the project's calls.
    p = np.load(out / "ref.npy")[:, 1]
    logit = np.log(np.clip(p, 1e-7, 1 - 1e-7) / (1 - np.clip(p, 1e-7, 1 - 1e-7)))
    q = 1 / (1 + np.exp(-logit / c["decision_rule"]["temperature"]))
    calls = np.where(q >= c["decision_rule"]["threshold"], "all", "hem")
    assert (calls == mf.rule.decide(p)["prediction"].to_numpy()).all()


def test_export_cli(tmp_path):
    from training.cli import main

    assert main(["export", "starter", "--format", "keras", "--out", str(tmp_path / "k")]) == 0
    assert {p.name for p in (tmp_path / "k").iterdir()} == {"model.keras", "contract.json", "card.md"}
    assert main(["export", "no-such-run", "--out", str(tmp_path / "x"), "--runs-dir", str(tmp_path / "runs")]) == 2
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(create_model("solution_a", SIZE), "pickle", tmp_path / "p", DecisionRule(), 100, "x")
