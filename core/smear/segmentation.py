"""From a blood-smear field to C-NMC-like crops: find the white cells, split touching ones, cut each on black.

C-NMC cells were segmented from microscope fields by the dataset's authors; a pathologist has the fields. This
module finds white blood cells (WBCs) in an RGB field of a May-Grünwald-Giemsa / Wright-like stained smear, at
any camera resolution and magnification (tuned on ALL-IDB1's 1712×1368 and 2592×1944 photos, checked on BCCD's
640×480 fields):

1. the ruler: red cells are the field's own (7-8 µm in every smear). On a copy at most 800 px a side, the
   area-weighted median diameter of the single round red cells of three candidate red-cell masks (`_red_cell_ruler`),
   else the typical inscribed circle of their clumps;
2. detection runs on a copy where a red cell spans `WORK_RBC_PX` pixels, so every size rule below is in red cells;
3. white cells: pixels whose violet score (`_violet`: violet minus green plus blue minus red) stands well above
   the field's median (background and red cells); holes filled; components smaller than `MIN_WBC_AREA` red cells
   (platelets, debris) dropped;
4. touching white cells split by a watershed whose markers are the deep maxima of the distance transform of the
   stained pixels before filling (the seams between packed cells), only for blobs too big and too concave for one
   cell; a piece with too little stain (a lobe of one nucleus) gives its marker up;
5. a cell cut by the image border is kept when at least `BORDER_KEEP` red-cell areas of it are inside (flagged
   `at_border`); each kept cell becomes a C-NMC-like crop: its mask on black, centred in a 450×450 frame, scaled
   so that a red cell would span `RBC_TARGET_PX` pixels;
6. optionally each crop's stain is brought toward C-NMC's (Reinhard colour transfer in LAB on the cell's pixels,
   `core.image.stain.reinhard`, targets measured on C-NMC fold 1).

The scale rule: C-NMC's cells (normal lymphoid cells about 9 µm across) measure a median 228 px equivalent
diameter in its 450-px tiles (the real samples), about 25 px/µm; a 7.5 µm red cell is therefore 190 px at C-NMC
scale. Fields from other labs differ in stain, magnification and camera: every crop still goes through the
classifier's out-of-distribution gate. An image that is already one cell on black (a C-NMC tile) is returned
as one cell, unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FRAME = 450  # C-NMC tile side
CNMC_PX_PER_UM = 25.0  # median C-NMC cell, 228 px, taken as a ~9 µm lymphoid cell
RBC_UM = 7.5
RBC_TARGET_PX = RBC_UM * CNMC_PX_PER_UM  # a red cell's diameter at C-NMC scale (~190 px)
MIN_SIDE = 200  # a photo smaller than this a side is not a field (judged by its red cells from here up)
MIN_SIDE_NO_RULER = 300  # ... and one with no red cell to measure must be at least this large
MIN_RBC_PX = 8.0  # red cells narrower than this (in the photo's pixels) are too coarse to judge white cells
MAX_UPSAMPLE = 4.0  # a small photo is enlarged at most this much for the ruler and detection
RULER_VIOLET_SHARE = 0.75  # a red-cell candidate less violet (`_violet`) than this share of the field's strongest stain
RULER_MAX_OVER_TYPICAL = 2.0  # a red-cell candidate at most this many times the median candidate's diameter
PURPLE_SHARE = 0.5  # a white cell is at least this share as purple (`_purple`) as the field's most purple one
WORK_SIDE = 1024  # without a ruler, detection runs on a copy at most this large (speed)
RULER_SIDE = 800  # the red-cell ruler is read on a copy at most this large
RULER_MIN_SIDE = 480  # ... and at least this large (a smaller photo is enlarged for it)
WORK_RBC_PX = 32.0  # with a ruler, detection runs on a copy where a red cell is this wide (any magnification)
MIN_WBC_AREA = 0.35  # the smallest white cell (or cell fragment) kept, in red-cell areas
NUCLEUS_CONTRAST = 30.0  # a white cell's violet score above the field's median (`_violet`)
NUCLEUS_SHARE = 0.45  # ... and at least this share of the field's strongest stain
SPLIT_DEPTH = 0.2  # a split's marker stands this many white-cell radii above the saddle to its neighbours
SPLIT_SOLIDITY = 0.9  # a blob is split only when less convex than this (its area over its hull's)
SPLIT_MIN_PIECE = 0.65  # a piece of a split with fewer stained pixels than this many red-cell areas is a lobe
BORDER_KEEP = 0.8  # a cell cut by the border is kept when its part inside is at least this many red-cell areas


@dataclass
class SegmentedCell:
    """One white cell: its number in the field (1-based), box in field pixels (x0, y0, x1, y1), mask area in
    field pixels, and its C-NMC-like crop (450×450×3 uint8, the cell on black)."""

    number: int
    box: tuple[int, int, int, int]
    mask_area: int
    crop: np.ndarray
    mask: np.ndarray  # bool, the box's size: the cell's pixels inside its box
    at_border: bool = False  # cut by the image border (kept because most of a cell is inside)
    context: np.ndarray | None = None  # the cell in its surroundings: a square window of the field, PAIR_TILE px


PAIR_TILE = 224  # side of each half of a paired crop (`paired_crop`)
CONTEXT_SPAN = 1.5  # a context window spans this many times the cell's larger box side (+ 16 px)


def context_window(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The cell with its surroundings, unmasked: a square of the field centred on the box (cut at the field's
    edges), `PAIR_TILE` px. A cell on black loses the red cells and neighbours a smear model can compare it with."""
    from PIL import Image

    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    cx, cy, s = (x0 + x1) // 2, (y0 + y1) // 2, int(CONTEXT_SPAN / 2 * max(x1 - x0, y1 - y0)) + 8
    win = np.ascontiguousarray(img[max(0, cy - s):min(h, cy + s), max(0, cx - s):min(w, cx + s), :3])
    return np.asarray(Image.fromarray(win).resize((PAIR_TILE, PAIR_TILE), Image.Resampling.BILINEAR))


def paired_crop(cell: "SegmentedCell") -> np.ndarray:
    """What a smear model that looks at both takes: the cell on black (left) beside its context (right), one
    PAIR_TILE × 2·PAIR_TILE image (the model splits it again; `core.smear.fields.takes_context`)."""
    return pair_tiles(cell.crop, cell.context)


def pair_tiles(crop: np.ndarray, context: np.ndarray | None) -> np.ndarray:
    """`paired_crop` of a crop (the 450-px cell on black) and its context window, as arrays."""
    from core.image.preprocessing import crop_cell

    alone = crop_cell(crop, size=PAIR_TILE, margin=0)
    # a cell that came on black (a C-NMC-style tile) has no surroundings: black is its context, and the smear
    # model's gate judges whether that is anything like its training cells
    return np.concatenate([alone, context if context is not None else alone], axis=1)


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
    `normalize_stain` brings each crop's colours toward C-NMC's stain (`core.image.stain.reinhard`); a C-NMC-style
    tile is left as it is. Never raises on an image: a photo that cannot be judged (too small, not colour, red
    cells too coarse, or an unexpected failure) comes back with no cells and `message` saying why, so a batch
    goes on with that photo's `cannot judge` row."""
    try:
        img = _check(img, name)
        if _black_background(img):
            return _single_cell(img)
        result = _segment(img, name)
    except Exception as exc:  # noqa: BLE001 - one photo's failure is that photo's row, never the batch's
        shape = getattr(img, "shape", None)
        log.warning("segmentation of %s failed", name, exc_info=not isinstance(exc, ValueError))
        why = str(exc) if isinstance(exc, ValueError) else f"{name}: segmentation failed ({type(exc).__name__}: {exc})"
        return FieldResult([], np.zeros(shape[:2] if shape is not None and len(shape) >= 2 else (0, 0), np.int32),
                           None, 1.0, 0, "field", why)
    if normalize_stain:
        from core.image.stain import reinhard

        for c in result.cells:
            c.crop = np.rint(reinhard(c.crop)).astype(np.uint8)
        result.notes.append("each crop's stain normalised toward C-NMC's (Reinhard colour transfer in LAB)")
    return result


def _resized(img: np.ndarray, f: float) -> np.ndarray:
    """`img` scaled by `f` (area averaging when shrinking: PIL's box filter, far cheaper than a Gaussian
    anti-aliasing pass over a 5-megapixel photo; bilinear when enlarging a small photo)."""
    from PIL import Image

    if f == 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
        size, Image.Resampling.BOX if f < 1 else Image.Resampling.BILINEAR))


def _nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label image brought to `shape` by nearest-neighbour indexing (labels must not be interpolated)."""
    rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1).astype(int)
    return labels[rows][:, cols]


def _violet(x: np.ndarray) -> np.ndarray:
    """How stained a pixel is with the nuclear (violet-blue) dye: violet minus green, plus blue minus red. Nuclei
    of every white cell score high (violet ones on the first term, deep blue ones on the second), red cells low
    (pink: their green is low too, but their red is well above their blue), the grey background near zero."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return (r + b) / 2 - g + (b - r)


def _purple(x: np.ndarray) -> np.ndarray:
    """Violet minus green alone: what tells a stained nucleus (well above zero in every lab's stain) from the
    blue-grey red cells of a bluish stain (Aria's photos), which score high on blue minus red only."""
    return (x[..., 0] + x[..., 2]) / 2 - x[..., 1]


def _white_cell_mask(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(white-cell pixels, the same before closing and filling) of a float RGB image: the white cells are the
    pixels whose violet score (`_violet`) stands `NUCLEUS_CONTRAST` above the field's median (the background
    and red cells, which cover most of any field)."""
    from scipy import ndimage as ndi
    from skimage import morphology

    v = _violet(x)
    # above the background and red cells by a margin, and, where nuclei stain deeply (BCCD), above the lilac
    # of its red cells: a fixed share of the field's strongest stain
    cut = max(float(np.median(v)) + NUCLEUS_CONTRAST, NUCLEUS_SHARE * float(np.percentile(v, 99.9)))
    raw = ndi.binary_opening(v > cut, morphology.disk(1))
    wbc = ndi.binary_fill_holes(ndi.binary_closing(raw, morphology.disk(2)))
    wbc = ndi.binary_opening(wbc, morphology.disk(2))
    return wbc, raw


@dataclass
class _Scale:
    """Where detection runs: the red-cell ruler in field pixels (None without one), the factor from the field to
    the detection copy `small` (above 1 for a small photo: upsampled), and a red cell's diameter there."""

    rbc_full: float | None
    f: float
    small: np.ndarray
    wbc: np.ndarray
    raw: np.ndarray

    @property
    def rbc_d(self) -> float | None:
        return self.rbc_full * self.f if self.rbc_full else None

    @property
    def ref_area(self) -> float | None:
        return np.pi * (self.rbc_d / 2) ** 2 if self.rbc_d else None


class _Refusal(ValueError):
    """A photo the segmentation cannot judge, with the measured reason (and its red-cell ruler, when measured)."""

    def __init__(self, message: str, rbc: float | None = None):
        super().__init__(message)
        self.rbc = rbc


def _segment(img: np.ndarray, name: str) -> FieldResult:
    """The four steps: the ruler sets the scale, detection finds the white-cell pixels, touching cells are split,
    and the cells go back to full resolution as crops. A photo refused on the way gets no cells and the reason."""
    try:
        sc = _ruler_and_scale(img, name)
        wbc, r_close = _detect(sc)
    except _Refusal as why:
        return _empty(img, str(why), why.rbc)
    if not wbc.any():
        return _empty(img, f"{name}: no white cells found", sc.rbc_full)
    labels = _split_touching(wbc, sc)
    return _back_to_full_resolution(img, labels, sc, r_close, name)


def _ruler_and_scale(img: np.ndarray, name: str) -> _Scale:
    """Step 1: the red-cell ruler, read on a copy `RULER_SIDE` px a side (upsampled when the photo is smaller, so
    the ruler's pixel rules hold on a 224-px photo), and the detection copy where a red cell spans `WORK_RBC_PX`
    pixels whatever the camera and magnification (at most `MAX_UPSAMPLE` times the photo). A photo whose red
    cells are too coarse, or a small photo with no red cell to measure, is refused with the measured reason."""
    h, w = img.shape[:2]
    f0 = RULER_SIDE / max(h, w) if max(h, w) > RULER_SIDE else min(MAX_UPSAMPLE, max(1.0, RULER_MIN_SIDE / max(h, w)))
    coarse = _resized(img, f0)
    xc = coarse.astype(np.float32)
    if np.ptp(xc.mean(-1)) < 20:
        raise _Refusal(f"{name}: no white cells found (the image is nearly uniform)")
    wbc, raw = _white_cell_mask(xc)
    # a red-cell candidate covers at least 30 px of the photo itself (an enlarged speck is still a speck)
    d0 = _red_cell_ruler(xc, wbc, 30.0 * max(1.0, f0) ** 2)
    rbc_full = d0 / f0 if d0 else None
    if rbc_full is not None and rbc_full < MIN_RBC_PX:
        raise _Refusal(f"{name}: red cells {rbc_full:.0f} px across: too coarse to judge white cells (at least "
                       f"{MIN_RBC_PX:.0f} px needed)", rbc_full)
    if rbc_full is None and min(h, w) < MIN_SIDE_NO_RULER:
        raise _Refusal(f"{name}: no red cell found to measure the scale, and at {w}x{h} px the photo is too small "
                       f"to judge white cells without one (at least {MIN_SIDE_NO_RULER} px a side)")
    f = min(MAX_UPSAMPLE, WORK_RBC_PX / rbc_full) if rbc_full else min(1.0, WORK_SIDE / max(h, w))
    if abs(f - f0) < 1e-9:
        return _Scale(rbc_full, f, coarse, wbc, raw)
    small = _resized(img, f)
    wbc, raw = _white_cell_mask(small.astype(np.float32))
    return _Scale(rbc_full, f, small, wbc, raw)


def _detect(sc: _Scale) -> tuple[np.ndarray, int]:
    """Step 2: the white cells on the detection copy: lobes joined, then what is too small (platelets, debris) or
    too little stained (red cells of a bluish stain) dropped. Returns (mask, closing radius)."""
    from scipy import ndimage as ndi
    from skimage import measure, morphology

    wbc, rbc_d, ref_area = sc.wbc, sc.rbc_d, sc.ref_area
    r_close = max(1, int(0.1 * rbc_d)) if rbc_d is not None else 0
    if r_close:  # a white cell's nucleus may come in lobes: join what lies within a fifth of a red cell
        wbc = ndi.binary_fill_holes(ndi.binary_closing(wbc, morphology.disk(r_close)))
    wbc_labels = measure.label(wbc)
    comp = measure.regionprops(wbc_labels, intensity_image=_purple(sc.small.astype(np.float32)))
    min_area = MIN_WBC_AREA * ref_area if ref_area else 0.0005 * sc.small.shape[0] * sc.small.shape[1]
    largest = max((p.area for p in comp), default=0)
    keep = np.zeros(wbc_labels.max() + 1, bool)
    for p in comp:  # without a ruler, white cells come in one size class: far smaller than the largest is debris
        keep[p.label] = p.area >= (min_area if ref_area else max(min_area, 0.25 * largest))
    # a nucleus is purple in every lab's stain; the blue-grey red cells of a bluish stain pass the violet score
    # but are far less purple than the field's white cells
    purple = {p.label: float(np.median(p.image_intensity[p.image])) for p in comp if keep[p.label]}
    top = max(purple.values(), default=0.0)
    for label, value in purple.items():
        keep[label] = value >= PURPLE_SHARE * top
    return keep[wbc_labels], r_close


def _split_touching(wbc: np.ndarray, sc: _Scale) -> np.ndarray:
    """Step 3: touching white cells split. Markers: deep maxima of the distance transform of the white-cell
    pixels *before* closing and filling (the pale seams between packed cells are still gaps there; the filled
    mask of a compact cluster has one peak in its middle); the watershed then runs on the filled mask. Only what
    is too big for one white cell is split (with a ruler, more than 1.35 times a 1.25-red-cell white cell;
    otherwise 1.6 times the field's median blob: a lobed nucleus is one cell), and a piece with less stain than
    a small nucleus gives its marker up (the split is redone without it). Returns the label image."""
    from scipy import ndimage as ndi
    from skimage import measure, morphology, segmentation

    rbc_d, ref_area, raw = sc.rbc_d, sc.ref_area, sc.raw
    blobs = measure.label(wbc)
    areas = np.bincount(blobs.ravel())[1:]
    props = measure.regionprops(blobs)
    radius = 0.65 * (rbc_d if rbc_d else float(np.median([p.equivalent_diameter_area for p in props])) / 1.5)
    single = 1.35 * np.pi / 4 * (1.25 * rbc_d) ** 2 if rbc_d else (
        1.6 * float(np.median(areas)) if len(areas) >= 3 else np.inf)
    # ... and only a blob with a concave outline: packed cells meet at notches, one lobed cell is convex
    solid = np.array([p.solidity for p in props])
    big = np.isin(blobs, 1 + np.nonzero((areas > single) & (solid < SPLIT_SOLIDITY))[0])
    labels = blobs.copy()
    if not big.any():
        return segmentation.relabel_sequential(labels)[0]
    # only the big blobs' bounding box is worked on (the h-maxima transform is the costly step)
    rows, cols = np.nonzero(big)
    win = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    seams = np.zeros(wbc.shape)
    seams[win] = ndi.distance_transform_edt(np.pad(raw[win] & big[win], 1))[1:-1, 1:-1]
    # markers: maxima standing at least a fifth of a white-cell radius above the saddle to any other (two packed
    # round cells meet at a neck well below their centres; the bumps of one irregular cell do not)
    tops = np.zeros(wbc.shape, bool)
    tops[win] = morphology.h_maxima(seams[win], SPLIT_DEPTH * radius)
    tops = measure.label(tops & big)
    peaks = np.array([np.round(p.centroid).astype(int) for p in measure.regionprops(tops)], int).reshape(-1, 2)
    split = np.zeros(wbc.shape, np.int32)
    for _ in range(2):
        if not len(peaks):  # no marker left (a lone blob with no deep peak): the blob stays one cell
            break
        markers = np.zeros(wbc.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        split = segmentation.watershed(-seams, markers, mask=big)
        # counted in stained pixels before filling: the lobes of one nucleus are small there
        small_piece = np.bincount(split[raw], minlength=len(peaks) + 1)[1:] < SPLIT_MIN_PIECE * (
            ref_area if ref_area else np.median(areas))
        if not small_piece.any():
            break
        peaks = peaks[~small_piece]
        if not len(peaks):
            split = np.zeros(wbc.shape, np.int32)
    labels[big] = 0
    labels[split > 0] = split[split > 0] + labels.max()
    orphan = big & (split == 0)  # a big blob whose markers all went: one cell
    if orphan.any():
        rest = measure.label(orphan)
        labels[rest > 0] = rest[rest > 0] + labels.max()
    return segmentation.relabel_sequential(labels)[0]


def _back_to_full_resolution(img: np.ndarray, labels: np.ndarray, sc: _Scale, r_close: int,
                             name: str) -> FieldResult:
    """Step 4: the labels back at the photo's resolution; a cell cut by the border is kept when enough of it is in
    the field; each kept cell becomes its crop and context window."""
    from skimage import measure

    h, w = img.shape[:2]
    f, ref_area, rbc_full = sc.f, sc.ref_area, sc.rbc_full
    full = labels if f == 1.0 else _nearest(labels, (h, w)).astype(np.int32)
    m = max(1, int(np.ceil((3 + r_close) / f)))  # within reach of the border (morphology erodes a mask's edge)
    border = set(np.unique(np.concatenate([full[:m].ravel(), full[-m:].ravel(), full[:, :m].ravel(),
                                           full[:, -m:].ravel()])).tolist())
    scale = RBC_TARGET_PX / rbc_full if rbc_full else _scale_by_size(full)
    cells, kept = [], np.zeros_like(full)
    dropped = 0
    min_area = MIN_WBC_AREA * ref_area if ref_area else 0.0005 * sc.small.shape[0] * sc.small.shape[1]
    min_full = min_area / f / f
    for p in measure.regionprops(full):
        if p.area < min_full:
            continue
        at_border = p.label in border
        if at_border and (not ref_area or p.area < BORDER_KEEP * ref_area / f / f):
            dropped += 1
            continue
        y0, x0, y1, x1 = p.bbox
        mask = p.image
        crop = _frame(img[y0:y1, x0:x1] * mask[..., None], scale)
        number = len(cells) + 1
        kept[y0:y1, x0:x1][mask] = number
        box = (int(x0), int(y0), int(x1), int(y1))
        cells.append(SegmentedCell(number, box, int(p.area), crop, mask, bool(at_border),
                                   context_window(img, box)))
    notes = [] if rbc_full else ["no red cells found to measure: crops scaled by the white cells' own size"]
    if f > 1.0:
        notes.append(f"a small photo: white cells found on a copy enlarged {f:.1f}x (red cells {rbc_full:.0f} px "
                     "across here)")
    msg = "" if cells else f"{name}: no white cells found" + (
        f" ({dropped} cut by the image border)" if dropped else "")
    return FieldResult(cells, kept, rbc_full, float(scale), dropped, "field", msg, notes)


def _red_cell_ruler(x: np.ndarray, wbc: np.ndarray, min_area: float = 30.0) -> float | None:
    """A red cell's diameter in `x`'s pixels, or None. Three masks of red cells are tried: (1) the middle class of
    a three-class Otsu on green (background / red cells / white cells: right where many dark white cells pull a
    two-class threshold between them and everything else, as on ALL-IDB1's 1712×1368 photos); (2) the objects
    of a two-class Otsu that are not white cells (BCCD's crowded fields); (3) the pink pixels (red above blue
    beyond the background's tint). From a mask: the area-weighted median diameter of its single round red cells
    when they are at least 5 (3 on masks 2 and 3) and a fair share of the mask; failing that on every mask, the
    typical inscribed circle of the clumps. Of several rulers the largest wins: a mask that misses the red cells
    measures fragments of them, never whole cells larger than they are."""
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology
    from skimage.feature import peak_local_max

    grey = x.mean(-1)  # objects: darker than the background
    objects = morphology.remove_small_objects(grey < filters.threshold_otsu(grey), max_size=15)
    near_wbc = ndi.binary_dilation(wbc, morphology.disk(3))
    blue_excess = x[..., 2] - x[..., 0]
    green = x[..., 1]
    masks = []
    try:
        t = filters.threshold_multiotsu(green, classes=3)
        masks.append(((green < t[1]) & (blue_excess < 10) & ~near_wbc, 5))
    except ValueError:  # too few grey levels for three classes
        pass
    masks.append((objects & ~near_wbc, 3))
    # (4) the same without the white cells pulling the threshold: where a few very dark nuclei sit on a pale
    # field (Aria's photos), a two-class Otsu over every pixel splits them from everything else, red cells included
    rest = grey[~near_wbc]
    if rest.size and np.ptp(rest) > 0:
        masks.append(((grey < filters.threshold_otsu(rest)) & ~near_wbc, 3))
    red_excess = -blue_excess
    masks.append((red_excess > (float(np.median(red_excess[~objects])) + 8.0 if (~objects).any() else 8.0), 3))
    # a round object stained like the field's white cells is one: where the white-cell mask misses cells (a dense
    # field of blasts), they must not be taken for red cells (far larger ones)
    v = _violet(x)
    too_violet = RULER_VIOLET_SHARE * float(np.percentile(v, 99.9))
    singles, clumps = [], []
    for rbc, need in masks:
        rbc = ndi.binary_fill_holes(ndi.binary_opening(rbc, morphology.disk(2)))
        # cheapest tests first: a convex hull per candidate (solidity) is the costly one
        props = [p for p in measure.regionprops(measure.label(rbc), intensity_image=v) if p.area >= min_area
                 and p.eccentricity < 0.75 and np.median(p.image_intensity[p.image]) < too_violet
                 and p.solidity > 0.9]
        # a round object over twice the typical one is a clump of red cells (or a missed white cell), not one
        if props:
            typical = float(np.median([p.equivalent_diameter_area for p in props]))
            props = [p for p in props if p.equivalent_diameter_area <= RULER_MAX_OVER_TYPICAL * typical]
        # area-weighted: platelets, specks and pallor fragments are round too and may outnumber the red cells
        if len(props) >= need and sum(p.area for p in props) >= 0.05 * rbc.sum():
            singles.append(_weighted_median([p.equivalent_diameter_area for p in props], [p.area for p in props]))
        elif rbc.sum() > 0.02 * rbc.size:  # clumped red cells: the inscribed circles of the clumps
            dist = ndi.distance_transform_edt(rbc)
            tops = peak_local_max(dist, min_distance=15, threshold_abs=6, exclude_border=True)
            if len(tops) >= 5:  # the upper quartile: overlaps make many inscribed circles too small
                clumps.append(2.0 * float(np.percentile(dist[tuple(tops.T)], 75)) + 1.0)
    return max(singles) if singles else (max(clumps) if clumps else None)


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


def segment_files(paths, out_dir, normalize_stain: bool = False, paired: bool = False,
                  outlines: dict | None = None) -> "pd.DataFrame":
    """Segment each field file and write its crops as `<field stem>_cell<NN>.png` under `out_dir`; one row per
    cell (box in field pixels, mask area), or one row with `error` (bad file, no white cells) per field that
    gave none: a bad field fails alone. `paired`: each crop is written as its `paired_crop` (cell and context,
    for a model that takes both: `core.smear.fields.takes_context`). `outlines`, when given, gains each cell's
    outline in field pixels, keyed (field, cell number) (`core.smear.qupath.cell_outline`: for a GeoJSON export)."""
    import pandas as pd
    from PIL import Image

    from core.data.imageio import read_image

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
            Image.fromarray(paired_crop(c) if paired else c.crop).save(target)
            if outlines is not None:
                from core.smear.qupath import cell_outline

                outlines[(str(path), c.number)] = cell_outline(c.mask, c.box)
            x0, y0, x1, y1 = c.box
            rows.append({"field": str(path), "cell": c.number, "crop": str(target), "x0": x0, "y0": y0, "x1": x1,
                         "y1": y1, "mask_area_px": c.mask_area, "rbc_diameter_px": result.rbc_diameter_px,
                         "scale": result.scale, "kind": result.kind})
    return pd.DataFrame(rows, columns=CSV_COLUMNS)
