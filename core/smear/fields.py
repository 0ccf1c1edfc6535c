"""A smear field in, per-cell calls out: segment the white cells, classify each crop, summarise the field.

`core.smear.segmentation` turns a field into C-NMC-like crops; this module puts each crop through the same
classification as an uploaded cell (`core.decide.inference.classify`: the decision rule *and* the out-of-distribution
gate, so a crop unlike the training cells is "not assessed", never called), and returns what a page draws: a table
with each cell's number, box and mask area beside its call, the crops, a per-field summary, and the field with
numbered outlines coloured by call.

It also reads a field out the way a pathologist asks (`field_readout`, `fields_readout`): how many white cells were
found, how many the model could judge, how many blasts, the blast fraction among the judged with its 95% Wilson
interval, and a call for the field (`blasts` / `no blasts` / `cannot judge`) with the reason in plain words and
the cells that made it; the same pooled over all the fields of one patient (one upload). The call rule lives in
one place, `CallRule`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from core.decide.calibration import CallRule

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
    model: str | None = None  # which model judged the cells (its description), for the table and read-out
    # cell number -> its outline: a closed counter-clockwise ring of [x, y] in the photo's pixels
    # (`core.smear.qupath.cell_outline`), for QuPath and any drawing finer than the box
    outlines: dict = field(default_factory=dict)


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


PAIR_LAYER = "cell_half"  # a model with this layer takes paired crops (`core.smear.segmentation.paired_crop`)


def takes_context(models: Sequence) -> bool:
    """Whether the model judges a cell beside its surroundings (the smear model) rather than on black alone."""
    return any(layer.name == PAIR_LAYER for layer in models[0].layers)


def classify_field(models: Sequence, image: np.ndarray, name: str, size: int, rule=None, gate=None,
                   margin: int = 100, on_chunk: Callable[[list[str], np.ndarray], None] | None = None,
                   normalize_stain: bool = False, model: str | None = None) -> FieldCalls:
    """Segment `image` (an RGB smear field) and classify each white cell it holds; a field that cannot be
    segmented (too small, not colour) or holds no white cell comes back with `error` saying so.
    `normalize_stain` brings each crop toward C-NMC's stain first (`core.smear.segmentation.segment_field`); `model`
    (the judging model's description) becomes the table's `model` column."""
    from core.decide.inference import classify
    from core.smear.segmentation import segment_field

    seg = segment_field(image, name, normalize_stain)  # never raises: a photo it cannot judge says why
    if not seg.cells:
        return FieldCalls(name, pd.DataFrame(), {}, None, _summary(pd.DataFrame(), seg), seg.notes,
                          error=seg.message or f"{name}: no white cells found", model=model)
    crops: dict[str, np.ndarray] = {}

    def keep(names, batch):
        crops.update(zip(names, batch))
        if on_chunk is not None:
            on_chunk(names, batch)

    if takes_context(models):
        from core.smear.segmentation import paired_crop

        items = [(cell_name(name, c.number), paired_crop(c)) for c in seg.cells]
    else:
        items = [(cell_name(name, c.number), c.crop) for c in seg.cells]
    calls = classify(models, items, size, rule, on_chunk=keep, gate=gate, margin=margin)
    boxes = pd.DataFrame([{"field": name, "cell": c.number, "x0": c.box[0], "y0": c.box[1], "x1": c.box[2],
                           "y1": c.box[3], "mask_area_px": c.mask_area} for c in seg.cells])
    table = pd.concat([boxes, calls.rename(columns={"name": "cell_name"})], axis=1)
    table.insert(2, "call", [call_of(r) for r in table.to_dict("records")])
    if model is not None:
        table["model"] = model
    overlay = field_overlay(image[..., :3], seg.labels, dict(zip(table["cell"], table["call"])))
    from core.smear.qupath import cell_outlines

    return FieldCalls(name, table, crops, overlay, _summary(table, seg), seg.notes, model=model,
                      outlines=cell_outlines(seg.cells))


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


# --- the read-out: per field and pooled over a patient's fields -------------------------------------------------
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95% interval
POOLED = "all fields"  # the `field` of the pooled row
READOUT_COLUMNS = ["field", "white_cells", "judged", "review", "blasts", "blast_fraction", "blast_fraction_low",
                   "blast_fraction_high", "call", "why", "blast_cells", "model"]


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (NaN, NaN for n = 0). Why Wilson: a field has a
    handful of cells, where the normal (Wald) interval leaves [0, 1] and has zero width at 0 of n or n of n;
    Wilson's stays inside [0, 1] and still says how little 0 of 5 proves."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _cells_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """The per-cell columns the read-out needs, under one set of names whichever table they come from
    (`classify_field`'s, the CLI's, or the dashboard's renamed one)."""
    t = cells.rename(columns={"calibrated_prob_blast": "prob_all_calibrated", "review_manually": "uncertain"})
    out = pd.DataFrame({"field": t["field"].astype(str) if "field" in t else pd.Series(dtype=str)})
    out["cell"] = t["cell"] if "cell" in t else np.arange(1, len(t) + 1)
    out["prediction"] = t["prediction"] if "prediction" in t else None
    out["prob"] = pd.to_numeric(t.get("prob_all_calibrated", pd.Series(np.nan, index=t.index)), errors="coerce")
    out["uncertain"] = t.get("uncertain", pd.Series(False, index=t.index)).fillna(False).astype(bool)
    out["ood_reason"] = t.get("ood_reason", pd.Series(None, index=t.index, dtype=object))
    out["error"] = t.get("error", pd.Series(None, index=t.index, dtype=object))
    out["model"] = t.get("model", pd.Series(None, index=t.index, dtype=object))
    return out.reset_index(drop=True)


def _cell_label(cell) -> str:
    return str(int(cell)) if pd.notna(cell) else "?"


def _counts(c: pd.DataFrame, rule: CallRule) -> dict:
    judged = c["prediction"].notna()
    blast = c["prediction"] == "all"
    bar = blast if rule.min_blast_prob is None else blast & (c["prob"] >= rule.min_blast_prob)
    refused = c.loc[~judged & c["ood_reason"].notna(), "ood_reason"]
    return {"white_cells": int(len(c)), "judged": int(judged.sum()), "review": int((judged & c["uncertain"]).sum()),
            "blasts": int(blast.sum()), "bar": bar.to_numpy(), "bar_review": int((bar & c["uncertain"]).sum()),
            "refused": int(len(refused)), "unreadable": int((~judged & c["ood_reason"].isna()).sum()),
            "top_reason": refused.value_counts().index[0] if len(refused) else None}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def field_call(n: dict, rule: CallRule, where: str = "") -> tuple[str, str]:
    """(call, why) from a field's (or the pooled) counts by `rule`; `where` ends the sentence (' in 3 fields')."""
    found, judged, bar = n["white_cells"], n["judged"], int(np.sum(n["bar"]))
    if found == 0:
        return "cannot judge", f"no white cell found{where}"
    if judged < rule.min_judged or judged < rule.min_judged_fraction * found:
        rest = []
        if n["refused"]:
            rest.append("outside what the model can judge" + (f": mostly '{n['top_reason']}'" if n["top_reason"]
                                                               else ""))
        if n["unreadable"]:
            rest.append(f"{n['unreadable']} could not be read")
        if judged == 0:
            head = (f"the one white cell found{where} could not be judged" if found == 1 else
                    f"none of the {found} white cells{where} could be judged")
        elif judged < rule.min_judged and judged >= rule.min_judged_fraction * found:
            head = (f"only {_plural(judged, 'judged cell')}{where}, fewer than the {rule.min_judged} the rule "
                    "asks for")
        else:
            head = f"only {judged} of {found} white cells{where} could be judged"
        return "cannot judge", head + (f" ({'the rest ' if judged else ''}{'; '.join(rest)})" if rest else "")
    among = f"among {_plural(judged, 'judged cell')}{where}"
    left = found - judged
    tail = f"; {left} of {found} white cells not judged" if left else ""
    short = bar >= rule.min_blasts and bar < rule.min_blast_fraction * judged  # enough cells, too small a share
    if bar >= rule.min_blasts and not short:
        review = f" ({n['bar_review']} of them in the review band: look by eye)" if n["bar_review"] else ""
        what = (_plural(bar, "blast") if rule.min_blast_prob is None else
                f"{_plural(bar, 'cell')} called blast with calibrated P(blast) ≥ {rule.min_blast_prob:.2f}")
        return "blasts", f"{what} {among}{review}{tail}"
    why = f"no blast {among}"
    if short:
        strict = "" if rule.min_blast_prob is None else f" with calibrated P(blast) ≥ {rule.min_blast_prob:.2f}"
        why = (f"{_plural(bar, 'cell')} called blast{strict} {among}: {bar / judged:.0%}, under the "
               f"{rule.min_blast_fraction:.0%} share the rule asks for")
    elif n["blasts"]:  # called blast, but under the rule's bar (a stricter probability, or more blasts)
        strict = "" if rule.min_blast_prob is None else f" with calibrated P(blast) ≥ {rule.min_blast_prob:.2f}"
        why = (f"{_plural(n['blasts'], 'cell')} called blast {among}, none{strict}" if bar == 0 else
               f"{_plural(bar, 'cell')} called blast{strict} {among}, fewer than the {rule.min_blasts} the rule "
               "asks for")
    if n["review"]:
        why += f" ({n['review']} in the review band: look by eye)"
    return "no blasts", why + tail


def _row(field_name: str, n: dict, rule: CallRule, blast_cells: list[str], model, where: str = "") -> dict:
    call, why = field_call(n, rule, where)
    low, high = wilson_interval(n["blasts"], n["judged"])
    return {"field": field_name, "white_cells": n["white_cells"], "judged": n["judged"], "review": n["review"],
            "blasts": n["blasts"], "blast_fraction": n["blasts"] / n["judged"] if n["judged"] else float("nan"),
            "blast_fraction_low": low, "blast_fraction_high": high, "call": call, "why": why,
            "blast_cells": ", ".join(blast_cells), "model": model}


def _problem_why(field_name: str, message: str) -> str:
    """A segmentation or file message without the field's name in front (the row names the field)."""
    for prefix in (f"{field_name}: ", f"{Path(field_name).name}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def field_readout(cells: pd.DataFrame, fields: Sequence[str] | None = None,
                  problems: dict[str, str] | None = None, rule: CallRule | None = None, model: str | None = None,
                  pooled: bool = True) -> pd.DataFrame:
    """One row per field (`READOUT_COLUMNS`) and, with `pooled`, a last row `field = "all fields"` whose counts
    are the sums over the fields and whose fraction, interval and call are those of the summed counts.

    `cells`: one row per white cell found, with `field`, `cell` and the classification's `prediction`,
    calibrated probability, review flag, `ood_reason` and `error`. `fields`: every field of the upload in order
    (a field with no cell still gets a row); `problems`: field -> why it gave no cell (a bad file, no white cell
    found), said in its row's `why`. `model`: which model judged (else the cells' own `model` column)."""
    rule = rule or CallRule()
    problems = dict(problems or {})
    c = _cells_frame(cells)
    if model is not None:
        c["model"] = model
    order = list(fields) if fields is not None else list(dict.fromkeys([*c["field"], *problems]))
    rows, pooled_bar = [], []
    for name in order:
        mine = c[c["field"] == str(name)]
        n = _counts(mine, rule)
        marks = mine.loc[n["bar"], "cell"]
        pooled_bar += [f"{Path(str(name)).name}:{_cell_label(v)}" for v in marks]
        models = list(dict.fromkeys(mine["model"].dropna()))
        row = _row(str(name), n, rule, [_cell_label(v) for v in marks], "; ".join(models) or model)
        if not len(mine) and name in problems:
            row["why"] = _problem_why(str(name), problems[name])
        rows.append(row)
    table = pd.DataFrame(rows, columns=READOUT_COLUMNS)
    if pooled:
        sub = c[c["field"].isin([str(f) for f in order])]
        n = _counts(sub, rule)
        unjudged = int((table["call"] == "cannot judge").sum())
        where = f" in {_plural(len(order), 'field')}" if len(order) != 1 else ""
        row = _row(POOLED, n, rule, pooled_bar, "; ".join(dict.fromkeys(sub["model"].dropna())) or model, where)
        if unjudged and len(order) > 1 and row["call"] != "cannot judge":  # a pooled call some fields lack
            row["why"] += f"; {unjudged} of the {len(order)} fields could not be judged alone"
        table = pd.concat([table, pd.DataFrame([row], columns=READOUT_COLUMNS)], ignore_index=True)
    return table


def fields_readout(field_calls: Iterable[FieldCalls], rule: CallRule | None = None,
                   failed: dict[str, str] | None = None, order: Sequence[str] | None = None) -> pd.DataFrame:
    """`field_readout` of classified fields (`classify_field`'s results) plus uploads meant as fields that could
    not even be read (`failed`: name -> why), pooled over all of them (one upload: one patient)."""
    field_calls = list(field_calls)
    tables = [fc.table.assign(field=fc.name, model=fc.model) for fc in field_calls if len(fc.table)]
    cells = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["field", "cell"])
    problems = {fc.name: fc.error for fc in field_calls if not len(fc.table) and fc.error}
    problems.update(failed or {})
    names = list(order) if order is not None else [fc.name for fc in field_calls] + [
        f for f in (failed or {}) if f not in {fc.name for fc in field_calls}]
    table = field_readout(cells, names, problems, rule)
    models = {fc.name: fc.model for fc in field_calls if fc.model}
    table["model"] = [m if isinstance(m, str) and m else models.get(f) for f, m in zip(table["field"], table["model"])]
    table.attrs["rule"] = (rule or CallRule()).describe()  # the page says which rule made the calls
    return table


def readout_line(row: dict) -> str:
    """One read-out row in one line of plain words (the CLI's summary): call, counts, blast fraction with its CI
    and why. No list of blast cells: pooled over a patient's 50 photos that is hundreds of names on one line,
    which buries the call; the cells stay in the read-out CSV (`blast_cells`) and the per-cell table."""
    name = row["field"] if row["field"] == POOLED else Path(str(row["field"])).name
    line = (f"{name}: {row['call']}: {_plural(int(row['white_cells']), 'white cell')}, {int(row['judged'])} judged, "
            f"{_plural(int(row['blasts']), 'blast')}")
    if row["judged"]:
        line += (f", blast fraction {row['blast_fraction']:.0%} (95% CI {row['blast_fraction_low']:.0%}-"
                 f"{row['blast_fraction_high']:.0%})")
    return f"{line}; {row['why']}"
