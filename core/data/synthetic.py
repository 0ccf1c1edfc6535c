"""Synthetic C-NMC-like cells and a writer for the real Kaggle folder layout and names.

Why: the real dataset cannot be downloaded here, yet every code path (layout discovery, subject ids, the
prelim CSV, splits, training) must run on data shaped exactly like it.

The model of a cell: a 450x450 RGB tile, black background, one stained cell near the centre.
- `hem` (normal): round, smooth border, nucleus ~72% of the radius, fine chromatin, no nucleoli.
- `all` (blast): irregular border, larger cell and nucleus, coarse chromatin, nucleoli and vacuoles.
Each cell draws a morphology coordinate t in [0, 1] (0 = typical hem, 1 = typical blast) around its class
centre; `difficulty` in [0, 1] pulls the two centres together (0: far apart; 1: identical, unlearnable).
Each subject has its own stain (hue, brightness) and a small morphology offset: a batch effect, so a leaky
image-level split can score higher than a subject-level one when morphology is hard.

Label noise: with probability `noise` (epsilon) a cell's morphology is drawn from the other class while its
file keeps its subject's label. With difficulty low enough that the classes are otherwise separable
(difficulty <= 0.5 keeps the centres >= 4 sigma apart), the best achievable accuracy is therefore 1 - epsilon.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.atomic import atomic_path
from core.data.imageio import encode_bmp

SIDE = 450
PATCH = 352  # cells are rendered in a centred patch; the rest of the tile stays black
MORPH_SIGMA = 0.1
V5_FRACTION = 0.1  # share of files written with the 124-byte BMP header, as newer re-exports have

KAGGLE_ROOT = "C-NMC_Leukemia"
TRAIN_DIR = f"{KAGGLE_ROOT}/training_data"
PRELIM_DIR = f"{KAGGLE_ROOT}/validation_data/C-NMC_test_prelim_phase_data"
PRELIM_CSV = f"{KAGGLE_ROOT}/validation_data/C-NMC_test_prelim_phase_data_labels.csv"
FINAL_DIR = f"{KAGGLE_ROOT}/testing_data/C-NMC_test_final_phase_data"


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass(frozen=True)
class Stain:
    """Per-subject staining: multiplicative RGB gains and a brightness factor (the batch effect)."""

    gain: tuple[float, float, float]
    brightness: float
    morph_offset: float

    @classmethod
    def for_subject(cls, subject: str, seed: int) -> "Stain":
        r = _rng("stain", seed, subject)
        gain = tuple(float(g) for g in np.clip(r.normal(1.0, [0.10, 0.18, 0.10]), 0.6, 1.5))
        return cls(gain, float(r.uniform(0.8, 1.25)), float(r.normal(0.0, 0.04)))


def morphology(label: str, rng: np.random.Generator, difficulty: float, noise: float, offset: float = 0.0) -> tuple[float, bool]:
    """Morphology coordinate t of one cell and whether its morphology was flipped by label noise."""
    flipped = bool(rng.random() < noise)
    is_all = (label == "all") != flipped
    half = 0.5 * (1.0 - float(np.clip(difficulty, 0.0, 1.0)))
    centre = 0.5 + half if is_all else 0.5 - half
    return float(np.clip(rng.normal(centre + offset, MORPH_SIGMA), -0.2, 1.2)), flipped


def _radial(theta: np.ndarray, rng: np.random.Generator, amp: float, kmax: int = 8) -> np.ndarray:
    out = np.ones_like(theta)
    for k in range(2, kmax + 1):
        out += amp * rng.normal(0, 1) / math.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return out


def _blurred_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-6)


def render_cell(t: float, stain: Stain, rng: np.random.Generator) -> np.ndarray:
    """Render one 450x450 RGB uint8 tile for morphology coordinate t (0 hem-like ... 1 blast-like)."""
    tc = float(np.clip(t, 0.0, 1.0))
    lerp = lambda a, b: a + (b - a) * tc  # noqa: E731
    P = PATCH
    cy, cx = rng.normal(0, 10, 2)
    yy, xx = np.mgrid[0:P, 0:P].astype(np.float32)
    yy -= P / 2 + cy
    xx -= P / 2 + cx
    r = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)
    # Cell outline: smooth and round for hem, lobed and irregular for blasts; slight ellipticity for both.
    radius = lerp(100.0, 116.0) * rng.uniform(0.9, 1.1)
    ell = 1 + rng.uniform(0, 0.12) * np.cos(2 * (theta - rng.uniform(0, math.pi)))
    border = radius * ell * _radial(theta, rng, lerp(0.025, 0.13))
    cell = np.clip(border - r + 0.5, 0, 1)
    # Nucleus: eccentric in hem (a visible cytoplasm rim), filling almost the whole cell in blasts.
    nfrac = lerp(0.70, 0.92) * rng.uniform(0.95, 1.03)
    shift = (1 - nfrac) * radius * 0.6
    ang = rng.uniform(0, 2 * math.pi)
    ny, nx = yy - shift * math.sin(ang), xx - shift * math.cos(ang)
    nr, nth = np.hypot(ny, nx), np.arctan2(ny, nx)
    nborder = nfrac * radius * ell * _radial(nth, rng, lerp(0.02, 0.09))
    nucleus = np.clip((nborder - nr) / 2.0 + 0.5, 0, 1) * cell
    # Chromatin: fine for hem, coarse and contrasted for blasts.
    fine = _blurred_noise(rng, (P, P), 1.0)
    coarse = _blurred_noise(rng, (P, P), lerp(1.5, 4.0))
    chrom = lerp(0.10, 0.26) * coarse + 0.06 * fine
    nuc_rgb = np.array([60.0, 24.0, 74.0]) * (1 + chrom[..., None])
    light = np.clip(coarse - 1.2, 0, None)[..., None] * np.array([30.0, 12.0, 18.0]) * lerp(0.4, 1.0)
    nuc_rgb = nuc_rgb + light
    cyto_rgb = np.array([88.0, 48.0, 108.0]) * (1 + 0.05 * fine[..., None])
    img = cyto_rgb * (cell - nucleus)[..., None] + nuc_rgb * nucleus[..., None]
    # Nucleoli (pale, round) and vacuoles (clear holes): a blast feature.
    for _ in range(int(rng.poisson(lerp(0.0, 2.5)))):
        rr = rng.uniform(0, 0.55) * nfrac * radius
        a = rng.uniform(0, 2 * math.pi)
        d = np.hypot(ny - rr * math.sin(a), nx - rr * math.cos(a))
        spot = np.clip((rng.uniform(4, 8) - d) / 1.5, 0, 1) * nucleus
        img += spot[..., None] * (np.array([96.0, 58.0, 112.0]) - img) * 0.8
    for _ in range(int(rng.poisson(lerp(0.0, 2.0)))):
        rr = rng.uniform(0.3, 0.9) * radius
        a = rng.uniform(0, 2 * math.pi)
        d = np.hypot(yy - rr * math.sin(a), xx - rr * math.cos(a))
        hole = np.clip((rng.uniform(3, 7) - d) / 1.5, 0, 1) * cell
        img += hole[..., None] * (np.array([150.0, 120.0, 165.0]) - img) * 0.7
    img *= np.array(stain.gain) * stain.brightness
    img *= cell[..., None] > 0.02  # pure black background, as in segmented C-NMC tiles
    tile = np.zeros((SIDE, SIDE, 3), np.uint8)
    o = (SIDE - P) // 2
    tile[o:o + P, o:o + P] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return tile


# ----------------------------------------------------------------------------------------------------------
# Plans: which file gets which class and subject
@dataclass
class CellSpec:
    relpath: str  # under the output root
    label: str  # class whose subject the cell belongs to (what names/CSV say)
    subject: str  # generating subject (for unlabelled cells too)


def _uid(subject: str, image: int, cell: int, label: str, lower_h: bool = False) -> str:
    s = subject.lower() if lower_h and subject.startswith("H") else subject
    return f"UID_{s}_{image}_{cell}_{label}.bmp"


def default_plan(cells_per_subject: int = 20, all_subjects: int = 12, hem_subjects: int = 12,
                 prelim_subjects: int = 4, final_subjects: int = 2, seed: int = 0) -> tuple[list[CellSpec], pd.DataFrame]:
    """A small C-NMC-shaped dataset: subjects spread over three folds, prelim (CSV-labelled), final (unlabelled)."""
    rng = _rng("plan", seed)
    specs: list[CellSpec] = []
    subj_all = [str(i) for i in range(1, all_subjects + 1)]
    subj_hem = [f"H{i}" for i in range(1, hem_subjects + 1)]

    def cells_of(subject, label, n):
        out, image = [], 1
        while len(out) < n:
            for c in range(1, int(rng.integers(1, 4)) + 1):
                if len(out) < n:
                    out.append((image, c))
            image += 1
        return [(subject, i, c, label) for i, c in out]

    for k, s in enumerate(subj_all + subj_hem):
        label = "all" if s in subj_all else "hem"
        fold = k % 3
        lower = label == "hem" and k % 5 == 0  # some real files use a lower-case h
        for subject, i, c, lab in cells_of(s, label, cells_per_subject):
            specs.append(CellSpec(f"{TRAIN_DIR}/fold_{fold}/{label}/{_uid(subject, i, c, lab, lower)}", lab, subject))
    prelim = []
    for j in range(prelim_subjects):
        label = "all" if j % 2 == 0 else "hem"
        s = str(100 + j) if label == "all" else f"H{100 + j}"
        prelim += cells_of(s, label, cells_per_subject)
    order = rng.permutation(len(prelim))
    rows = []
    for new, k in enumerate(order, start=1):
        subject, i, c, lab = prelim[k]
        specs.append(CellSpec(f"{PRELIM_DIR}/{new}.bmp", lab, subject))
        rows.append({"Patient_ID": _uid(subject, i, c, lab), "new_names": f"{new}.bmp", "labels": int(lab == "all")})
    for j in range(final_subjects * cells_per_subject):
        s = str(200 + j % final_subjects)
        specs.append(CellSpec(f"{FINAL_DIR}/{j + 1}.bmp", "all" if rng.random() < 0.68 else "hem", s))
    return specs, pd.DataFrame(rows, columns=["Patient_ID", "new_names", "labels"])


def _keep(names: list[str], fraction: float, key: str) -> list[str]:
    """Deterministic subset of about `fraction`, at least one, chosen by a stable hash of each name."""
    n = max(1, int(round(len(names) * fraction)))
    return sorted(names, key=lambda x: hashlib.blake2b(f"{key}|{x}".encode(), digest_size=8).digest())[:n]


def replica_plan(file_list: str | os.PathLike, fraction: float = 1.0, labels_csv: str | os.PathLike | None = None,
                 seed: int = 0) -> tuple[list[CellSpec], pd.DataFrame]:
    """The real Kaggle tree (names, per-fold counts, subjects) from its file list, scaled to `fraction`.

    Every training subject keeps at least one cell; prelim cells keep their real numbered names and CSV rows
    (subject and label come from the official label CSV, by default beside the file list).
    """
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    file_list = Path(file_list)
    labels_csv = Path(labels_csv) if labels_csv else file_list.parent / "C-NMC_test_prelim_phase_data_labels.csv"
    lines = [ln.strip() for ln in file_list.read_text().splitlines() if ln.strip().lower().endswith(".bmp")]
    from core.data.dataset import parse_uid

    specs: list[CellSpec] = []
    groups: dict[tuple[str, str], list[str]] = {}
    prelim_names, final_names = [], []
    for ln in lines:
        m = re.search(r"training_data/(fold_\d)/(all|hem)/(UID_[^/]+)$", ln)
        if m:
            p = parse_uid(m.group(3))
            groups.setdefault((p.subject, m.group(1)), []).append(ln)
        elif "prelim_phase_data/" in ln:
            prelim_names.append(ln)
        elif "final_phase_data/" in ln:
            final_names.append(ln)
    for (subject, _), names in sorted(groups.items()):
        for ln in _keep(names, fraction, f"{seed}|{subject}"):
            specs.append(CellSpec(ln, parse_uid(ln.rsplit("/", 1)[1]).label, subject))
    csv = pd.read_csv(labels_csv, dtype=str)
    by_new = csv.set_index("new_names")
    prelim_by_subject: dict[str, list[str]] = {}
    for ln in prelim_names:
        new = ln.rsplit("/", 1)[1]
        if new in by_new.index:
            prelim_by_subject.setdefault(parse_uid(by_new.at[new, "Patient_ID"]).subject, []).append(ln)
    kept_rows = []
    for subject, names in sorted(prelim_by_subject.items()):
        for ln in _keep(names, fraction, f"{seed}|prelim|{subject}"):
            new = ln.rsplit("/", 1)[1]
            label = "all" if by_new.at[new, "labels"] == "1" else "hem"
            specs.append(CellSpec(ln, label, subject))
            kept_rows.append(new)
    rows = csv[csv["new_names"].isin(set(kept_rows))]
    rng = _rng("final", seed)
    for ln in _keep(final_names, fraction, f"{seed}|final"):
        specs.append(CellSpec(ln, "all" if rng.random() < 0.68 else "hem", f"F{int(rng.integers(1, 10))}"))
    return specs, rows.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
def _write_one(args) -> tuple[str, bool]:
    out, spec, seed, difficulty, noise = args
    stain = Stain.for_subject(spec.subject, seed)
    rng = _rng("cell", seed, spec.relpath)
    t, flipped = morphology(spec.label, rng, difficulty, noise, stain.morph_offset)
    tile = render_cell(t, stain, rng)
    header = "v5" if rng.random() < V5_FRACTION else "info"
    path = Path(out) / spec.relpath
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_bmp(tile, header))
    return spec.relpath, flipped


def write_dataset(out: str | os.PathLike, specs: list[CellSpec], prelim_rows: pd.DataFrame, seed: int = 0,
                  difficulty: float = 0.3, noise: float = 0.0, workers: int | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Render and write every planned cell (in parallel) plus the prelim label CSV; returns the ground truth.

    The returned table (also saved as `synthetic_truth.csv` beside the dataset) says, per file, its subject,
    label and whether label noise flipped its morphology, so tests can compute the achievable accuracy.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    for d in sorted({str(Path(s.relpath).parent) for s in specs}):
        (out / d).mkdir(parents=True, exist_ok=True)
    (out / PRELIM_CSV).parent.mkdir(parents=True, exist_ok=True)
    prelim_rows.to_csv(out / PRELIM_CSV, index=False)
    jobs = [(str(out), s, seed, difficulty, noise) for s in specs]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        flips = dict(tqdm(pool.map(_write_one, jobs, chunksize=16), total=len(jobs), disable=not progress,
                          desc="synthetic cells", unit="img", leave=False))
    truth = pd.DataFrame({"relpath": [s.relpath for s in specs], "subject": [s.subject for s in specs],
                          "label": [s.label for s in specs], "morphology_flipped": [flips[s.relpath] for s in specs]})
    truth.to_csv(out / "synthetic_truth.csv", index=False)
    (out / "SYNTHETIC.txt").write_text(
        "Synthetic C-NMC-like cells generated by core.data.synthetic (not real patient data).\n"
        f"seed={seed} difficulty={difficulty} noise={noise} cells={len(specs)}\n")
    return truth


DEMO_NOISE = 0.08  # default label noise: the demo model makes real mistakes (best achievable accuracy ~0.92)


def synthesize(out: str | os.PathLike, cells_per_subject: int = 20, noise: float = DEMO_NOISE, difficulty: float = 0.3,
               seed: int = 0, replica: float | None = None, file_list: str | os.PathLike | None = None,
               workers: int | None = None, progress: bool = True, **plan_kwargs) -> pd.DataFrame:
    """Generate a synthetic C-NMC dataset in the Kaggle layout (default plan, or a replica of the real tree)."""
    if replica is not None:
        if file_list is None:
            raise ValueError("replica mode needs the path of the Kaggle file list (kaggle_file_list.txt)")
        specs, rows = replica_plan(file_list, replica, seed=seed)
    else:
        specs, rows = default_plan(cells_per_subject, seed=seed, **plan_kwargs)
    return write_dataset(out, specs, rows, seed=seed, difficulty=difficulty, noise=noise, workers=workers,
                         progress=progress)
