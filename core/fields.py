"""A smear field in, per-cell calls out: segment the white cells, classify each crop, summarise the field.

`core.segmentation` turns a field into C-NMC-like crops; this module puts each crop through the same
classification as an uploaded cell (`core.inference.classify`: the decision rule *and* the out-of-distribution
gate, so a crop unlike the training cells is "not assessed", never called), and returns what a page draws: a table
with each cell's number, box and mask area beside its call, the crops, a per-field summary, and the field with
numbered outlines coloured by call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

# What each outline colour means, in the order a legend lists them.
CALL_COLOURS: dict[str, tuple[int, int, int]] = {
    "blast": (220, 30, 30), "normal": (20, 150, 60), "review": (245, 165, 0), "not assessed": (120, 120, 120)}


@dataclass
class FieldCalls:
    """One field's result: `table` has one row per white cell found (field, cell, cell_name, x0, y0, x1, y1,
    mask_area_px, call, then `classify`'s columns); `error` is set (and the rest empty) when the field could not
    be segmented at all."""

    name: str
    table: pd.DataFrame
    crops: dict[str, np.ndarray]  # cell name -> the crop as the model saw it
    overlay: np.ndarray | None  # the field with numbered outlines coloured by call
    summary: dict
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def cell_name(field_name: str, number: int) -> str:
    """The name a field's cell goes by everywhere (crops written by `segment`, tables, the audit trail)."""
    return f"{Path(field_name).stem}_cell{number:02d}.png"


def call_of(row) -> str:
    """blast / normal / review / not assessed, the four states an outline shows."""
    if row.get("out_of_distribution"):
        return "not assessed"
    if row.get("uncertain"):
        return "review"
    return "blast" if row.get("prediction") == "all" else "normal"


def classify_field(models: Sequence, image: np.ndarray, name: str, size: int, rule=None, gate=None,
                   margin: int = 100, on_chunk: Callable[[list[str], np.ndarray], None] | None = None,
                   normalize_stain: bool = False) -> FieldCalls:
    """Segment `image` (an RGB smear field) and classify each white cell it holds; a field that cannot be
    segmented (too small, not colour) or holds no white cell comes back with `error` saying so.
    `normalize_stain` brings each crop toward C-NMC's stain first (`core.segmentation.segment_field`)."""
    from core.inference import classify
    from core.segmentation import segment_field

    try:
        seg = segment_field(image, name, normalize_stain)
    except ValueError as exc:
        return FieldCalls(name, pd.DataFrame(), {}, None, {}, error=str(exc))
    if not seg.cells:
        return FieldCalls(name, pd.DataFrame(), {}, None, _summary(pd.DataFrame(), seg), seg.notes,
                          error=seg.message or f"{name}: no white cells found")
    crops: dict[str, np.ndarray] = {}

    def keep(names, batch):
        crops.update(zip(names, batch))
        if on_chunk is not None:
            on_chunk(names, batch)

    items = [(cell_name(name, c.number), c.crop) for c in seg.cells]
    calls = classify(models, items, size, rule, on_chunk=keep, gate=gate, margin=margin)
    boxes = pd.DataFrame([{"field": name, "cell": c.number, "x0": c.box[0], "y0": c.box[1], "x1": c.box[2],
                           "y1": c.box[3], "mask_area_px": c.mask_area} for c in seg.cells])
    table = pd.concat([boxes, calls.rename(columns={"name": "cell_name"})], axis=1)
    table.insert(2, "call", [call_of(r) for r in table.to_dict("records")])
    overlay = field_overlay(image[..., :3], seg.labels, dict(zip(table["cell"], table["call"])))
    return FieldCalls(name, table, crops, overlay, _summary(table, seg), seg.notes)


def _summary(table: pd.DataFrame, seg) -> dict:
    calls = table["call"].value_counts() if len(table) else pd.Series(dtype=int)
    assessed = int(calls.get("blast", 0) + calls.get("normal", 0) + calls.get("review", 0))
    blasts = int((table["prediction"] == "all").sum()) if len(table) else 0
    return {"cells_found": int(len(table)), "assessed": assessed, "blasts": blasts,
            "blast_fraction": blasts / assessed if assessed else float("nan"),
            "review": int(calls.get("review", 0)), "not_assessed": int(calls.get("not assessed", 0)),
            "cut_by_border": int(seg.dropped_at_border), "red_cell_diameter_px": seg.rbc_diameter_px,
            "kind": seg.kind}


def field_overlay(image: np.ndarray, labels: np.ndarray, calls: dict[int, str]) -> np.ndarray:
    """The field with each cell's outline in its call's colour (`CALL_COLOURS`) and its number beside it."""
    from PIL import Image, ImageDraw, ImageFont
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    width = max(2, round(max(image.shape[:2]) / 400))
    edges = find_boundaries(labels, mode="inner")
    edges = ndi.binary_dilation(edges, iterations=width - 1) & (labels > 0) if width > 1 else edges
    for number, call in calls.items():
        out[edges & (labels == number)] = CALL_COLOURS[call]
    im = Image.fromarray(out)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(14, round(max(image.shape[:2]) / 45)))
    boxes = ndi.find_objects(labels)
    for number, call in calls.items():
        sl = boxes[number - 1] if number - 1 < len(boxes) else None
        if sl is None:
            continue
        x, y = sl[1].start, max(0, sl[0].start - font.size - 2)
        draw.text((x, y), str(number), fill=CALL_COLOURS[call], font=font, stroke_width=2, stroke_fill=(255, 255, 255))
    return np.asarray(im)
