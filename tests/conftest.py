"""Shared fixtures: the real sample cells (skipped with a reason when absent) and small synthetic trees."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("CNMC_SAMPLES", REPO.parent / "shared" / "cnmc_samples"))


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not (SAMPLES / "training_like").is_dir():
        pytest.skip(f"real C-NMC sample cells not found at {SAMPLES} (set CNMC_SAMPLES); CI always has them")
    return SAMPLES


@pytest.fixture(scope="session")
def file_list(samples_dir) -> Path:
    return samples_dir / "kaggle_file_list.txt"


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A default-plan synthetic dataset: 24 training subjects over 3 folds, prelim with CSV, final."""
    from core.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth_small")
    synthesize(out, cells_per_subject=6, seed=3, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def replica_small(tmp_path_factory, file_list) -> Path:
    """A 2% replica of the real Kaggle tree: real names, every subject, real prelim CSV rows."""
    from core.synthetic import synthesize

    out = tmp_path_factory.mktemp("replica")
    synthesize(out, replica=0.02, file_list=file_list, seed=1, workers=2, progress=False)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo recipe (Solution A, 64 px) trained once on a 12-cells-per-subject synthetic set (ε = 0).

    Shared by the demo-accuracy, Grad-CAM, evaluation and dashboard tests; returns (store, run_id, data_dir).
    """
    from core.synthetic import synthesize
    from training.cli import demo_config
    from training.store import RunStore
    from training.trainer import train

    data = tmp_path_factory.mktemp("demo_data")
    synthesize(data, cells_per_subject=12, noise=0.0, seed=0, workers=2, progress=False)
    runs = tmp_path_factory.mktemp("demo_runs")
    store = RunStore(runs)
    run_id = train(demo_config(data, runs, epochs=6), store)
    assert store.get_run(run_id)["status"] == "completed", store.get_run(run_id)["error"]
    return store, run_id, data
