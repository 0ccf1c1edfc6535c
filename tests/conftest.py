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


SAMPLE_NAMES = ("UID_1_2_2_all.bmp", "UID_1_3_1_all.bmp", "UID_3_4_2_all.bmp", "UID_53_4_8_all.bmp",
                "UID_H10_47_2_hem.bmp", "UID_h3_4_1_hem.bmp", "UID_h3_5_1_hem.bmp")


@pytest.fixture(scope="session")
def cell_dir(tmp_path_factory) -> Path:
    """Seven labelled cells under the real samples' names: the real C-NMC samples where present (CI), else
    generated look-alikes (a user's clone), for tests whose point is not the real file format."""
    if (SAMPLES / "training_like").is_dir():
        return SAMPLES / "training_like"
    from core.data.synthetic import synthesize

    pool = tmp_path_factory.mktemp("lookalike_pool")
    synthesize(pool, cells_per_subject=1, noise=0.0, seed=5, workers=2, progress=False)
    blasts = sorted(pool.rglob("UID_*_all.bmp"))
    normals = sorted(pool.rglob("UID_*_hem.bmp"))
    out = tmp_path_factory.mktemp("lookalikes")
    for name, src in zip(SAMPLE_NAMES, blasts[:4] + normals[:3]):
        shutil.copy(src, out / name)
    return out


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A default-plan synthetic dataset: 24 training subjects over 3 folds, prelim with CSV, final."""
    from core.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth_small")
    synthesize(out, cells_per_subject=6, noise=0.0, seed=3, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def replica_small(tmp_path_factory) -> Path:
    """A 2% replica of the real Kaggle tree (real names, every subject, real prelim CSV rows) where the Kaggle
    file list is present; else the default synthetic plan, which has the same layout, folds and phases."""
    from core.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("replica")
    listing = SAMPLES / "kaggle_file_list.txt"
    if listing.is_file():
        synthesize(out, replica=0.02, file_list=listing, seed=1, workers=2, progress=False)
    else:
        synthesize(out, cells_per_subject=4, noise=0.0, seed=1, workers=2, progress=False)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo recipe (Solution A, 64 px) trained once on a 12-cells-per-subject synthetic set (ε = 0).

    Shared by the demo-accuracy, Grad-CAM, evaluation and dashboard tests; returns (store, run_id, data_dir).
    """
    from core.data.synthetic import synthesize
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


@pytest.fixture(scope="session", autouse=True)
def private_device_lock(tmp_path_factory):
    """Tests queue on their own device lock, not behind a real training run on the same machine."""
    os.environ["CNMC_LOCK_DIR"] = str(tmp_path_factory.mktemp("locks"))
    yield


def pytest_collection_modifyitems(config, items):
    """Tests that take the seven cells from `cell_dir` branch on whether ../shared is there: marked `samples`, so
    CI runs them a second time with the samples hidden (`CNMC_SAMPLES=/nonexistent pytest -m samples`), the path
    every user's clone takes."""
    for item in items:
        if "cell_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.samples)
