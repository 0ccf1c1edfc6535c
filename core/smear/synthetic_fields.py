"""Generated smear fields with known white cells: the ground truth the segmentation tests and benchmark need.

A light background; pink red cells (7.5 µm, `rbc_px` across) with central pallor; white cells 1.1-1.4 red cells
across with a textured purple nucleus and pale blue cytoplasm; small purple platelets; optionally pairs of
touching white cells and white cells cut by the border. Not a realistic smear: a controlled one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = (232, 226, 236)
RBC = (214, 128, 146)
PALLOR = (226, 176, 186)
CYTOPLASM = (176, 178, 218)
NUCLEUS = (96, 52, 142)
PLATELET = (128, 76, 164)


@dataclass
class TrueCell:
    y: float
    x: float
    r: float
    cut_by_border: bool


def _disc(canvas: np.ndarray, y: float, x: float, r: float, colour, rng=None, texture: float = 0.0) -> None:
    h, w = canvas.shape[:2]
    y0, y1, x0, x1 = max(0, int(y - r - 1)), min(h, int(y + r + 2)), max(0, int(x - r - 1)), min(w, int(x + r + 2))
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    col = np.asarray(colour, np.float32)
    if texture and rng is not None:
        patch = col + rng.normal(0, texture, (y1 - y0, x1 - x0, 1)).astype(np.float32)
    else:
        patch = np.broadcast_to(col, (y1 - y0, x1 - x0, 3))
    canvas[y0:y1, x0:x1][inside] = patch[inside] if patch.ndim == 3 else patch


def synth_field(height: int = 600, width: int = 800, wbc: int = 4, rbc: int = 40, platelets: int = 10,
                touching_pairs: int = 1, border_cells: int = 1, rbc_px: float = 40.0,
                seed: int = 0) -> tuple[np.ndarray, list[TrueCell]]:
    """An RGB uint8 field and its white cells (centre, radius, cut by the border or not)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = BACKGROUND
    cells: list[TrueCell] = []

    def free(y, x, r, others, gap=2.0):
        return all((y - c.y) ** 2 + (x - c.x) ** 2 >= (r + c.r + gap) ** 2 for c in others)

    def place(r, margin, others, tries=500):
        for _ in range(tries):
            y, x = rng.uniform(margin, height - margin), rng.uniform(margin, width - margin)
            if free(y, x, r, others):
                return y, x
        return None

    for _ in range(wbc):
        r = rng.uniform(0.55, 0.68) * rbc_px
        spot = place(r, r + 4, cells)
        if spot:
            cells.append(TrueCell(spot[0], spot[1], r, False))
    for _ in range(touching_pairs):
        r = 0.6 * rbc_px
        spot = place(2.2 * r, 2.2 * r + 4, cells)
        if spot:
            a = rng.uniform(0, np.pi)
            dy, dx = 0.95 * r * np.sin(a), 0.95 * r * np.cos(a)
            cells += [TrueCell(spot[0] - dy, spot[1] - dx, r, False), TrueCell(spot[0] + dy, spot[1] + dx, r, False)]
    for k in range(border_cells):
        r = 0.6 * rbc_px
        y = rng.uniform(r, height - r)
        x = 0.3 * r if k % 2 == 0 else width - 0.3 * r
        if free(y, x, r, cells):
            cells.append(TrueCell(y, x, r, True))
    reds: list[TrueCell] = []
    for _ in range(rbc):
        r = rng.normal(1.0, 0.05) * rbc_px / 2
        spot = place(r, r + 2, cells + reds)
        if spot:
            reds.append(TrueCell(spot[0], spot[1], r, False))
    for c in reds:
        _disc(canvas, c.y, c.x, c.r, RBC)
        _disc(canvas, c.y, c.x, 0.4 * c.r, PALLOR)
    for c in cells:
        _disc(canvas, c.y, c.x, c.r, CYTOPLASM)
    for c in cells:
        off = rng.normal(0, 0.08 * c.r, 2)
        _disc(canvas, c.y + off[0], c.x + off[1], rng.uniform(0.7, 0.82) * c.r, NUCLEUS, rng, texture=10.0)
    for _ in range(platelets):
        spot = place(3, 6, cells + reds)
        if spot:
            _disc(canvas, spot[0], spot[1], rng.uniform(2.0, 3.5), PLATELET)
    canvas = ndi.gaussian_filter(canvas, sigma=(1.0, 1.0, 0))
    canvas += rng.normal(0, 2.0, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), cells


def match(found_boxes: list[tuple[int, int, int, int]], truth: list[TrueCell]) -> dict:
    """Found objects vs true white cells: a true cell is found when one box's centre lies within its radius.
    Cells cut by the border should not be found (they count as errors if they are)."""
    inside = [c for c in truth if not c.cut_by_border]
    centres = [((y0 + y1) / 2, (x0 + x1) / 2) for x0, y0, x1, y1 in found_boxes]
    used = set()
    hits = 0
    for c in inside:
        for i, (cy, cx) in enumerate(centres):
            if i not in used and (cy - c.y) ** 2 + (cx - c.x) ** 2 <= c.r ** 2:
                used.add(i)
                hits += 1
                break
    found = len(centres)
    return {"true": len(inside), "found": found, "hits": hits,
            "recall": hits / len(inside) if inside else 1.0,
            "false_fraction": (found - hits) / found if found else 0.0}
