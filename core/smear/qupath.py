"""A classified smear field as QuPath reads it: one GeoJSON FeatureCollection per field, one detection per white cell.

A pathologist who checks the calls in QuPath (File -> Import objects) wants each white cell as an object on the
photo, outlined where the segmentation drew it and classed by the call (or by a person's verification), not a
CSV of boxes. Coordinates are QuPath's: pixels of the full-resolution photo, origin at the top-left corner of the
top-left pixel, so pixel (col, row) covers [col, col+1) x [row, row+1). `cell_outline` follows the cell's pixel
edges (`find_contours` gives the edge midpoints; the pixel corners between them are put back, so an unsimplified
ring encloses exactly the mask's area), then simplifies within ~1 px. Rings are closed and counter-clockwise by
their signed area in (x, y) as RFC 7946 asks (with y pointing down, as in an image, they look clockwise on screen;
QuPath does not mind either way).

Also `crops_zip`: the crops the model judged, as PNGs in one zip, for a download.
"""
from __future__ import annotations

import io
import json
import math
import re
import uuid
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from core.smear.fields import CALL_COLOURS, FieldCalls, call_of, cell_name

NOT_JUDGED = "not judged"  # QuPath's name for the "not assessed" call (the gate refused it, or it was unreadable)
# A QuPath class per state a cell can be in: the four calls, then the verifier's two extra answers.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "blast": CALL_COLOURS["blast"], "normal": CALL_COLOURS["normal"], "review": CALL_COLOURS["review"],
    NOT_JUDGED: CALL_COLOURS["not assessed"], "not a white cell": (40, 90, 220), "unsure": (150, 80, 200)}
SIMPLIFY_PX = 1.0  # outlines are simplified within this many pixels (a cell is 50-300 px across in a photo)
_NAMESPACE = uuid.UUID("6f1c3f0e-4a51-5d8b-9a63-0c2b9f7d1e42")  # fixed: the same cell gets the same id every export


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _pixel_edges(contour: np.ndarray) -> np.ndarray:
    """A marching-squares contour of a binary mask (edge midpoints, in (x, y) pixel-corner coordinates) with the
    pixel corner between each diagonal step put back: the ring along the pixel edges themselves."""
    out = [contour[0]]
    for a, b in zip(contour[:-1], contour[1:]):
        if a[0] != b[0] and a[1] != b[1]:  # a diagonal step cuts a corner
            a_on_horizontal = float(a[1]).is_integer()  # a midpoint of a horizontal edge has an integer y
            out.append(np.array([b[0], a[1]]) if a_on_horizontal else np.array([a[0], b[1]]))
        out.append(b)
    return np.asarray(out, float)


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """The closed ring without points that lie on the straight line through their neighbours."""
    pts = ring[:-1]
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    keep = pts[np.abs(cross) > 1e-9]
    return np.vstack([keep, keep[:1]])


def cell_outline(mask: np.ndarray, box: Iterable[int], tolerance: float = SIMPLIFY_PX) -> list[list[float]]:
    """The cell's outline as a closed, counter-clockwise ring of [x, y] in the photo's pixel coordinates (QuPath's:
    pixel (col, row) spans [col, col+1)), from its mask (bool, the box's size) and box (x0, y0, x1, y1, `x1`/`y1`
    exclusive as `SegmentedCell.box`): the largest piece's pixel-edge boundary, simplified within `tolerance` px.
    Why not the box: QuPath shows and measures the object, and a box is not the cell a person checks.
    An empty mask gives the box itself."""
    from skimage import measure

    x0, y0, x1, y1 = (int(v) for v in box)
    mask = np.asarray(mask, bool)
    rings = []
    if mask.any():
        # padded by one pixel: every contour closes; (row, col) of the padded array -> pixel-corner (x, y)
        for c in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
            if len(c) >= 4 and np.allclose(c[0], c[-1]):
                rings.append(_pixel_edges(np.column_stack([c[:, 1] - 0.5 + x0, c[:, 0] - 0.5 + y0])))
    if not rings:
        ring = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)
    else:
        ring = max(rings, key=lambda r: abs(_signed_area(r)))  # the outer boundary, not a hole or a speck
        ring = _drop_collinear(ring)
        # start at a true corner (the top-left-most vertex) so the simplification keeps the corners it should
        start = int(np.lexsort((ring[:-1, 0], ring[:-1, 1]))[0])
        ring = np.vstack([ring[start:-1], ring[:start], ring[start:start + 1]])
        simple = measure.approximate_polygon(ring, tolerance) if tolerance > 0 else ring
        if len(simple) >= 4 and abs(_signed_area(simple)) > 0 and np.allclose(simple[0], simple[-1]):
            ring = simple  # a speck a pixel or two wide keeps its unsimplified ring (at least a triangle)
    if _signed_area(ring) < 0:
        ring = ring[::-1]
    return [[float(x), float(y)] for x, y in ring]


def cell_outlines(cells: Iterable) -> dict[int, list[list[float]]]:
    """cell number -> `cell_outline` for `core.smear.segmentation.SegmentedCell`s (what `FieldCalls.outlines`
    holds)."""
    return {int(c.number): cell_outline(c.mask, c.box) for c in cells}


def _box_ring(row: Mapping) -> list[list[float]] | None:
    try:
        x0, y0, x1, y1 = (float(row[k]) for k in ("x0", "y0", "x1", "y1"))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return None
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell_class(row: Mapping, decision: str | None = None) -> str:
    """The QuPath class of one cell (a `classify_field` table row): blast / normal / review / not judged by the
    model's call, or, once a person decided (`core.smear.verify.DECISIONS`), the verified class (a confirmed
    cell keeps its pre-classification: blast or normal by the model's prediction, not judged without one)."""
    from core.smear.verify import UNSURE, verified_class

    if decision is not None:
        if decision == UNSURE:
            return "unsure"
        return verified_class(dict(row), decision) or NOT_JUDGED
    if _missing(row.get("prediction")):  # refused by the gate, or its crop could not be read: never "normal"
        return NOT_JUDGED
    call = row.get("call")
    call = call if isinstance(call, str) and call else call_of(row)
    return NOT_JUDGED if call == "not assessed" else call


def _feature_id(field_name: str, number) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{Path(str(field_name)).name}#{number}"))


def field_geojson(fc: FieldCalls, decisions: Mapping[str, str] | None = None) -> dict:
    """One field as a GeoJSON FeatureCollection QuPath imports (File -> Import objects): a detection per white cell
    found (every row of `fc.table`), its outline (`fc.outlines`, else its box) as the Polygon, classed by
    `cell_class` (with `decisions`: cell_name -> verification decision), named by its cell name, measured by
    calibrated P(blast) (left out where there is none: JSON has no NaN) and cell number. Each feature has a stable
    id (the same field and cell give the same id), so a re-import can be matched to the last one."""
    decisions = dict(decisions or {})
    features = []
    for row in (fc.table.to_dict("records") if len(fc.table) else []):
        number = row.get("cell")
        number = int(number) if not _missing(number) else None
        name = row.get("cell_name")
        name = name if isinstance(name, str) and name else (cell_name(fc.name, number) if number else None)
        ring = (fc.outlines.get(number) if number is not None else None) or _box_ring(row)
        if ring is None:
            raise ValueError(f"{fc.name}: cell {number} has neither an outline nor a box to place it")
        decision = decisions.get(name) if name else None
        cls = cell_class(row, decision)
        measurements = {}
        if number is not None:
            measurements["Cell number"] = number
        prob = row.get("prob_all_calibrated")
        if not _missing(prob) and math.isfinite(float(prob)):
            measurements["P(blast) calibrated"] = float(prob)
        props = {"objectType": "detection", "name": name,
                 "classification": {"name": cls, "color": list(CLASS_COLOURS[cls])},
                 "measurements": measurements, "isLocked": False}
        if decision is not None:
            props["decision"] = decision
        features.append({"type": "Feature", "id": _feature_id(fc.name, number if number is not None else name),
                         "geometry": {"type": "Polygon", "coordinates": [[list(map(float, p)) for p in ring]]},
                         "properties": props})
    return {"type": "FeatureCollection", "features": features}


def geojson_path(field_name: str, out_dir: str | Path) -> Path:
    """Where `write_geojson` puts a field's objects: `<out_dir>/<field stem>.geojson`."""
    return Path(out_dir) / f"{Path(str(field_name)).stem}.geojson"


def write_geojson(fc: FieldCalls, out_dir: str | Path, decisions: Mapping[str, str] | None = None) -> Path:
    """`field_geojson` written as `<field stem>.geojson` under `out_dir` (created), strict JSON (a NaN refuses to
    be written rather than give QuPath a file it cannot parse). Returns the path."""
    path = geojson_path(fc.name, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(field_geojson(fc, decisions), allow_nan=False), encoding="utf-8")
    return path


def _zip_name(name: str, used: set[str]) -> str:
    """A safe, unique member name: no folders, no '..', plain characters, ending .png."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name).replace("\\", "/")).name).lstrip(".") or "cell"
    if not base.lower().endswith(".png"):
        base += ".png"
    out, k = base, 1
    while out in used:
        k += 1
        out = f"{base[:-4]}_{k}.png"
    used.add(out)
    return out


def crops_zip(crops: Mapping[str, np.ndarray]) -> bytes:
    """The cell crops (name -> RGB uint8 array, as `FieldCalls.crops`) as PNG files in one zip, for a download: a
    person can open every crop the model judged. Names are kept, made safe for a zip path (no folders)."""
    from PIL import Image

    buf = io.BytesIO()
    used: set[str] = set()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, crop in crops.items():
            png = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(np.asarray(crop, np.uint8))).save(png, format="PNG")
            zf.writestr(_zip_name(name, used), png.getvalue())
    return buf.getvalue()
