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
