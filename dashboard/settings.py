"""Where the dashboard finds its data and runs; set by environment variables, with safe defaults.

CNMC_RUNS_DIR    run store (default: runs)
CNMC_DATA_ROOTS  os.pathsep-separated folders whose sub-folders may be chosen as datasets (default: data)
CNMC_DEMO_DATA   the synthetic demo dataset (default: data/demo)
CNMC_ROLES       who may do what once sign-in is on (default: roles.toml; see dashboard/auth.py, docs/lab-server.md)
CNMC_LOCAL_MODE  1: serve unauthenticated local single-user mode even beyond loopback or behind a proxy (never
                 over a configured [auth]); see dashboard/auth.py, docs/lab-server.md
The Train page offers only the demo dataset and folders under the data roots, never an arbitrary server path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RESEARCH_BANNER = ("**Research use only — not a diagnostic device.** Predictions come from models trained on the "
                   "data named with each result; results on synthetic cells say nothing about real patients.")
MAX_UPLOAD_FILES = 500
SERVER_CONFIG = Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml"


def max_upload_mb() -> int:
    """The per-file upload limit the server enforces (`maxUploadSize` in .streamlit/config.toml; Streamlit's
    200 MB without one): the dashboard says the same limit in its own words, naming the file."""
    import tomllib

    try:
        return int(tomllib.loads(SERVER_CONFIG.read_text()).get("server", {}).get("maxUploadSize", 200))
    except (OSError, ValueError):
        return 200


@dataclass(frozen=True)
class Settings:
    runs_dir: Path
    data_roots: tuple[Path, ...]
    demo_data: Path

    @classmethod
    def from_env(cls) -> "Settings":
        roots = os.environ.get("CNMC_DATA_ROOTS", "data")
        return cls(runs_dir=Path(os.environ.get("CNMC_RUNS_DIR", "runs")).resolve(),
                   data_roots=tuple(Path(r).resolve() for r in roots.split(os.pathsep) if r),
                   demo_data=Path(os.environ.get("CNMC_DEMO_DATA", "data/demo")).resolve())

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
