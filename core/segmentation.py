"""From a blood-smear field to C-NMC-like crops: find the white cells, split touching ones, cut each on black.

C-NMC cells were segmented from microscope fields by the dataset's authors; a pathologist has the fields. This
module finds white blood cells (WBCs) in an RGB field of a May-Grünwald-Giemsa / Wright-like stained smear:

1. objects: pixels darker than the light background (Otsu on grey levels);
2. white cells: objects whose blue exceeds their red (nuclei are purple-blue, cytoplasm pale blue; red cells are
   pink: red above blue); holes filled; components far smaller than a red cell (platelets, debris) dropped;
3. touching white cells split by a distance-transform watershed (scikit-image), markers at least about a white
   cell's radius apart;
4. red cells are the field's own ruler (7-8 µm in every smear): the area-weighted median diameter of the single
   round ones sets the scale when they are at least 5% of the red-cell area (round platelets may outnumber
   them), else the typical inscribed circle of the pink pixels of clumped red cells;
5. cells cut by the image border are dropped; each kept cell becomes a C-NMC-like crop: its mask on black,
   centred in a 450×450 frame, scaled so that a red cell would span `RBC_TARGET_PX` pixels;
6. optionally each crop's stain is brought toward C-NMC's (Reinhard colour transfer in LAB on the cell's pixels,
   `core.stain.reinhard`, targets measured on C-NMC fold 1).

The scale rule: C-NMC's cells (normal lymphoid cells about 9 µm across) measure a median 228 px equivalent
diameter in its 450-px tiles (the real samples), about 25 px/µm; a 7.5 µm red cell is therefore 190 px at C-NMC
scale. Fields from other labs differ in stain, magnification and camera: every crop still goes through the
classifier's out-of-distribution gate. An image that is already one cell on black (a C-NMC tile) is returned
as one cell, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FRAME = 450  # C-NMC tile side
CNMC_PX_PER_UM = 25.0  # median C-NMC cell, 228 px, taken as a ~9 µm lymphoid cell
RBC_UM = 7.5
RBC_TARGET_PX = RBC_UM * CNMC_PX_PER_UM  # a red cell's diameter at C-NMC scale (~190 px)
MIN_SIDE = 300  # a field smaller than this cannot hold a white cell with context
WORK_SIDE = 1024  # detection runs on a copy at most this large (speed); crops come from the full image


@dataclass
class SegmentedCell:
    """One white cell: its number in the field (1-based), box in field pixels (x0, y0, x1, y1), mask area in
    field pixels, and its C-NMC-like crop (450×450×3 uint8, the cell on black)."""

    number: int
    box: tuple[int, int, int, int]
    mask_area: int
    crop: np.ndarray
    mask: np.ndarray  # bool, the box's size: the cell's pixels inside its box


@dataclass
class FieldResult:
    cells: list[SegmentedCell]
    labels: np.ndarray  # int32 label image of the kept cells, field size (0 = not a kept cell)
    rbc_diameter_px: float | None  # the ruler; None when no red cell was found
    scale: float  # crop pixels per field pixel
    dropped_at_border: int
    kind: str  # "field" or "single cell"
    message: str = ""
    notes: list[str] = field(default_factory=list)


def segment_field(img: np.ndarray, name: str = "image", normalize_stain: bool = False) -> FieldResult:
    """White cells of an RGB smear field as C-NMC-like crops; see the module docstring for the method.
    `normalize_stain` brings each crop's colours toward C-NMC's stain (`core.stain.reinhard`); a C-NMC-style
    tile is left as it is."""
    img = _check(img, name)
    if _black_background(img):
        return _single_cell(img)
    result = _segment(img, name)
    if normalize_stain:
        from core.stain import reinhard

        for c in result.cells:
            c.crop = np.rint(reinhard(c.crop)).astype(np.uint8)
        result.notes.append("each crop's stain normalised toward C-NMC's (Reinhard colour transfer in LAB)")
    return result


def _segment(img: np.ndarray, name: str) -> FieldResult:
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology, segmentation
    from skimage.feature import peak_local_max
    from skimage.transform import resize

    h, w = img.shape[:2]
    f = min(1.0, WORK_SIDE / max(h, w))
    small = img if f == 1.0 else (resize(img, (round(h * f), round(w * f)), order=1, anti_aliasing=True,
                                         preserve_range=True).astype(np.uint8))
    x = small.astype(np.float32)
    grey = x.mean(-1)
    if grey.max() - grey.min() < 20:
        return _empty(img, f"{name}: no white cells found (the image is nearly uniform)")
    objects = grey < filters.threshold_otsu(grey)
    objects = morphology.remove_small_objects(objects, max_size=15)
    blue_excess = x[..., 2] - x[..., 0]
    # white cells are bluer than red by well more than the background is (nuclei purple-blue, cytoplasm pale
    # blue; red cells are pink); the cut sits above the background's own tint (camera white balance)
    cut = max(15.0, float(np.median(blue_excess[~objects])) + 25.0) if (~objects).any() else 15.0
    wbc = ndi.binary_fill_holes(ndi.binary_closing(blue_excess > cut, morphology.disk(2)))
    wbc = ndi.binary_opening(wbc, morphology.disk(2))

    # the ruler: red cells are objects that are not (near) white cells; single round ones if there are enough,
    # else the typical inscribed radius of the red-cell mask (clumped, overlapping red cells)
    rbc = objects & ~ndi.binary_dilation(wbc, morphology.disk(3))
    rbc = ndi.binary_fill_holes(ndi.binary_opening(rbc, morphology.disk(2)))
    props = [p for p in measure.regionprops(measure.label(rbc)) if p.area >= 30 and p.solidity > 0.9
             and p.eccentricity < 0.75]
    # the area-weighted median: platelets, specks and pallor fragments are round too, and may outnumber the
    # few red cells a clumped field leaves single, but they weigh little next to the red cells' area
    # ... and the single round ones must be a fair share of all red-cell area, or they are debris, not a ruler
    enough = len(props) >= 3 and sum(p.area for p in props) >= 0.05 * rbc.sum()
    rbc_d = _weighted_median([p.equivalent_diameter_area for p in props], [p.area for p in props]) \
        if enough else None
    ruler_is_round = rbc_d is not None
    if rbc_d is None:  # clumped red cells: pink pixels (red above blue beyond the background's tint)
        red_excess = -blue_excess
        pink = red_excess > (float(np.median(red_excess[~objects])) + 8.0 if (~objects).any() else 8.0)
        pink = ndi.binary_fill_holes(ndi.binary_opening(pink, morphology.disk(2)))
        if pink.sum() > 0.02 * pink.size:
            dist_rbc = ndi.distance_transform_edt(pink)
            tops = peak_local_max(dist_rbc, min_distance=15, threshold_abs=6, exclude_border=True)
            if len(tops) >= 5:  # the upper quartile: overlaps make many inscribed circles too small
                rbc_d = 2.0 * float(np.percentile(dist_rbc[tuple(tops.T)], 75)) + 1.0
    r_close = max(1, int(0.1 * rbc_d)) if rbc_d is not None else 0
    if r_close:  # a white cell's nucleus may come in lobes: join what lies within a fifth of a red cell
        wbc = ndi.binary_fill_holes(ndi.binary_closing(wbc, morphology.disk(r_close)))

    wbc_labels = measure.label(wbc)
    comp = measure.regionprops(wbc_labels)
    ref_area = np.pi * (rbc_d / 2) ** 2 if rbc_d else None
    min_area = 0.35 * ref_area if ref_area else 0.0005 * small.shape[0] * small.shape[1]
    # white cells come in one size class: fragments, platelets and debris are far smaller than the largest
    largest = max((p.area for p in comp), default=0)
    keep = np.zeros(wbc_labels.max() + 1, bool)
    for p in comp:
        keep[p.label] = p.area >= max(min_area, 0.25 * largest)
    wbc = keep[wbc_labels]
    if not wbc.any():
        return _empty(img, f"{name}: no white cells found", rbc_d / f if rbc_d else None)

    # split touching white cells: markers a white-cell radius apart (a white cell is ~1.2-2 red cells across)
    dist = ndi.distance_transform_edt(wbc)
    blobs = measure.label(wbc)
    sizes = [p.equivalent_diameter_area for p in measure.regionprops(blobs)]
    radius = 0.65 * (rbc_d if rbc_d else float(np.median(sizes)) / 1.5)
    peaks = peak_local_max(dist, min_distance=max(3, int(radius)), threshold_abs=0.3 * radius,
                           labels=blobs, exclude_border=False)
    markers = np.zeros(wbc.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=wbc)
    # Split only what is too big for one white cell: with single round red cells measured, more than 1.5 times
    # a 1.25-red-cell white cell; otherwise more than 1.6 times the field's median white-cell blob (a lobed
    # nucleus is one cell). Components left whole, or without a marker, keep one label.
    areas = np.bincount(blobs.ravel())[1:]
    single = 1.5 * np.pi / 4 * (1.25 * rbc_d) ** 2 if ruler_is_round else (
        1.6 * float(np.median(areas)) if len(areas) >= 3 else np.inf)
    whole = np.isin(blobs, 1 + np.nonzero(areas <= single)[0]) | (wbc & (labels == 0))
    labels[whole] = 0
    rest = measure.label(whole)
    labels[rest > 0] = rest[rest > 0] + labels.max()
    labels = segmentation.relabel_sequential(labels)[0]

    # back to field resolution, drop cells cut by the border
    full = labels if f == 1.0 else resize(labels, (h, w), order=0, preserve_range=True,
                                          anti_aliasing=False).astype(np.int32)
    # cut by the border: within reach of it (the morphology above erodes a mask's last pixels at the edge)
    m = int(np.ceil((3 + r_close) / f))
    border = np.unique(np.concatenate([full[:m].ravel(), full[-m:].ravel(), full[:, :m].ravel(),
                                       full[:, -m:].ravel()]))
    rbc_full = rbc_d / f if rbc_d else None
    scale = RBC_TARGET_PX / rbc_full if rbc_full else _scale_by_size(full)
    cells, kept = [], np.zeros_like(full)
    dropped = 0
    for p in measure.regionprops(full):
        if p.label in border:
            dropped += 1
            continue
        if ref_area and p.area < min_area / f / f:
            continue
        y0, x0, y1, x1 = p.bbox
        mask = p.image
        crop = _frame(img[y0:y1, x0:x1] * mask[..., None], scale)
        number = len(cells) + 1
        kept[y0:y1, x0:x1][mask] = number
        cells.append(SegmentedCell(number, (int(x0), int(y0), int(x1), int(y1)), int(p.area), crop, mask))
    notes = [] if rbc_full else ["no red cells found to measure: crops scaled by the white cells' own size"]
    msg = "" if cells else f"{name}: no white cells found" + (
        f" ({dropped} cut by the image border)" if dropped else "")
    return FieldResult(cells, kept, rbc_full, float(scale), dropped, "field", msg, notes)


def _weighted_median(values, weights) -> float:
    order = np.argsort(values)
    v, w = np.asarray(values, float)[order], np.asarray(weights, float)[order]
    return float(v[np.searchsorted(np.cumsum(w), 0.5 * w.sum())])


def _check(img: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{name}: a smear field must be a colour (RGB) image; got an array of shape {img.shape}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected 8-bit colour, got {img.dtype}")
    if min(img.shape[:2]) < MIN_SIDE:
        raise ValueError(f"{name}: {img.shape[1]}x{img.shape[0]} px is too small for a smear field (at least "
                         f"{MIN_SIDE} px a side); a single segmented cell belongs in Classify as it is")
    return img


def _black_background(img: np.ndarray) -> bool:
    """A C-NMC-style tile (one cell on black) rather than a field: its border is black."""
    edge = np.concatenate([img[:4].reshape(-1, 3), img[-4:].reshape(-1, 3), img[:, :4].reshape(-1, 3),
                           img[:, -4:].reshape(-1, 3)])
    return float((edge.max(-1) <= 10).mean()) > 0.95


def _single_cell(img: np.ndarray) -> FieldResult:
    from skimage import measure

    fg = img.max(-1) > 10
    lab = measure.label(fg)
    if lab.max() == 0:
        return _empty(img, "the image is black: no cell")
    biggest = max(measure.regionprops(lab), key=lambda p: p.area)
    y0, x0, y1, x1 = biggest.bbox
    labels = (lab == biggest.label).astype(np.int32)
    crop = img if img.shape[:2] == (FRAME, FRAME) else _frame(img[y0:y1, x0:x1] * biggest.image[..., None], 1.0)
    cell = SegmentedCell(1, (int(x0), int(y0), int(x1), int(y1)), int(biggest.area), crop, biggest.image)
    return FieldResult([cell], labels, None, 1.0, 0, "single cell", "",
                       ["already one cell on black (a C-NMC-style tile): used as it is"])


def _empty(img: np.ndarray, message: str, rbc_d: float | None = None) -> FieldResult:
    return FieldResult([], np.zeros(img.shape[:2], np.int32), rbc_d, 1.0, 0, "field", message)


def _scale_by_size(labels: np.ndarray) -> float:
    """Without red cells: scale so the median white cell matches C-NMC's median cell (228 px across)."""
    from skimage import measure

    d = [p.equivalent_diameter_area for p in measure.regionprops(labels)]
    return 228.0 / float(np.median(d)) if d else 1.0


def _frame(cell: np.ndarray, scale: float) -> np.ndarray:
    """The cell (on black) scaled by `scale`, centred in a 450×450 black frame (shrunk further if too big)."""
    from PIL import Image

    h, w = cell.shape[:2]
    s = min(scale, 0.95 * FRAME / max(h, w))
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    im = Image.fromarray(np.ascontiguousarray(cell.astype(np.uint8))).resize(
        (nw, nh), Image.Resampling.BILINEAR if s > 1 else Image.Resampling.BOX)
    out = np.zeros((FRAME, FRAME, 3), np.uint8)
    top, left = (FRAME - nh) // 2, (FRAME - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(im)
    return out


CSV_COLUMNS = ["field", "cell", "crop", "x0", "y0", "x1", "y1", "mask_area_px", "rbc_diameter_px", "scale",
               "kind", "error"]


def segment_files(paths, out_dir, normalize_stain: bool = False) -> "pd.DataFrame":
    """Segment each field file and write its crops as `<field stem>_cell<NN>.png` under `out_dir`; one row per
    cell (box in field pixels, mask area), or one row with `error` (bad file, no white cells) per field that
    gave none: a bad field fails alone."""
    import pandas as pd
    from PIL import Image

    from core.imageio import read_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in map(Path, paths):
        try:
            result = segment_field(read_image(path), path.name, normalize_stain)
        except (ValueError, OSError) as exc:
            rows.append({"field": str(path), "error": str(exc)})
            continue
        if not result.cells:
            rows.append({"field": str(path), "error": result.message or f"{path.name}: no white cells found",
                         "rbc_diameter_px": result.rbc_diameter_px})
        for c in result.cells:
            target = out / f"{path.stem}_cell{c.number:02d}.png"
            Image.fromarray(c.crop).save(target)
            x0, y0, x1, y1 = c.box
            rows.append({"field": str(path), "cell": c.number, "crop": str(target), "x0": x0, "y0": y0, "x1": x1,
                         "y1": y1, "mask_area_px": c.mask_area, "rbc_diameter_px": result.rbc_diameter_px,
                         "scale": result.scale, "kind": result.kind})
    return pd.DataFrame(rows, columns=CSV_COLUMNS)
