"""Where the dashboard finds its data and runs; set by environment variables, with safe defaults.

CNMC_RUNS_DIR    run store (default: runs)
CNMC_DATA_ROOTS  os.pathsep-separated folders whose sub-folders may be chosen as datasets (default: data)
CNMC_DEMO_DATA   the synthetic demo dataset (default: data/demo)
CNMC_WEIGHTS_ROOTS  os.pathsep-separated folders whose `.weights.h5` files the Train page offers as a start
                 (default: weights); a run cannot start from any other file
CNMC_MAX_UPLOAD_TOTAL_MB  the most one Classify upload may hold, all its files together (default: 200)
CNMC_ROLES       who may do what once sign-in is on (default: roles.toml; see dashboard/auth.py, docs/lab-server.md)
CNMC_LOCAL_MODE  1: serve unauthenticated local single-user mode even beyond loopback or behind a proxy (never
                 over a configured [auth]); see dashboard/auth.py, docs/lab-server.md
The Train page offers only the demo dataset and folders under the data roots, and weights files under the weights
roots, never an arbitrary server path (`services.launch_run` refuses any other).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RESEARCH_BANNER = ("**Research use only — not a diagnostic device.** Predictions come from models trained on the "
                   "data named with each result; results on synthetic cells say nothing about real patients.")
MAX_UPLOAD_FILES = 500
MAX_CELL_PIXELS = 4_000_000  # a single cell (C-NMC: 450x450); a smear field may have core.data.imageio.MAX_PIXELS
MAX_UPLOAD_TOTAL_MB = 200  # one upload, all files together (CNMC_MAX_UPLOAD_TOTAL_MB)
MAX_WEIGHTS_FILES = 500  # the weights-file list stops here (a deep folder must not stall the page)
SERVER_CONFIG = Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml"


def max_upload_mb() -> int:
    """The per-file upload limit the server enforces (`maxUploadSize` in .streamlit/config.toml; Streamlit's
    200 MB without one): the dashboard says the same limit in its own words, naming the file."""
    import tomllib

    try:
        return int(tomllib.loads(SERVER_CONFIG.read_text()).get("server", {}).get("maxUploadSize", 200))
    except (OSError, ValueError):
        return 200


def max_upload_total_mb() -> int:
    """All files of one upload together: the server's per-file limit alone would let 500 files of 50 MB through."""
    try:
        return max(1, int(os.environ.get("CNMC_MAX_UPLOAD_TOTAL_MB", MAX_UPLOAD_TOTAL_MB)))
    except ValueError:
        return MAX_UPLOAD_TOTAL_MB


@dataclass(frozen=True)
class Settings:
    runs_dir: Path
    data_roots: tuple[Path, ...]
    demo_data: Path
    weights_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls) -> "Settings":
        roots = os.environ.get("CNMC_DATA_ROOTS", "data")
        return cls(runs_dir=Path(os.environ.get("CNMC_RUNS_DIR", "runs")).resolve(),
                   data_roots=_paths(roots),
                   demo_data=Path(os.environ.get("CNMC_DEMO_DATA", "data/demo")).resolve(),
                   weights_roots=_paths(os.environ.get("CNMC_WEIGHTS_ROOTS", "weights")))

    def datasets(self) -> dict[str, Path]:
        """Choosable datasets: the demo set and the direct sub-folders of each data root."""
        out = {"Synthetic demo dataset": self.demo_data}
        for root in self.data_roots:
            if root.is_dir():
                for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    if sub.resolve() != self.demo_data:
                        out[f"{root.name}/{sub.name}"] = sub.resolve()
        return out

    def is_allowed(self, path: Path) -> bool:
        path = path.resolve()
        return path in self.datasets().values()

    def weights_files(self) -> dict[str, Path]:
        """Choosable start weights: the `.weights.h5` files under the weights roots, label -> path."""
        out: dict[str, Path] = {}
        for root in self.weights_roots:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*.weights.h5")):
                if len(out) >= MAX_WEIGHTS_FILES:
                    return out
                if not any(part.startswith(".") for part in path.relative_to(root).parts):
                    out[f"{root.name}/{path.relative_to(root)}"] = path.resolve()
        return out

    def is_allowed_weights(self, path: str | Path) -> bool:
        return Path(path).resolve() in self.weights_files().values()


def _paths(value: str) -> tuple[Path, ...]:
    return tuple(Path(r).resolve() for r in value.split(os.pathsep) if r)
