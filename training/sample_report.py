"""One printable report per smear upload (one sample): what goes into a lab's records, as a self-contained HTML page
and the same figures as CSV.

Why a separate report from the run report (`training.report`): a run report describes a model; this one describes
one patient's sample as read by a model and, when a person verified its cells (`core.smear.verify`), as verified.
It says which sample (exactly as the user typed it: never derived from file names, which often carry nothing or
the wrong patient), which fields, per field and pooled the white cells found, judged, verified, blasts and the
blast share with its 95% interval, the call and why, both as pre-classified and after verification; which model
(description, SHA-256, its card's figures on data it never saw), who verified and when, who made the report and
when, and thumbnails of the blast cells.

The page is `templates/sample_report.html` filled by `string.Template`; every text from a user or a file goes
through `html.escape`, the page loads nothing from outside (thumbnails are data URIs, CSS inline, no script; its
Content-Security-Policy forbids scripts in any case) and prints on A4. The CSV cells that a spreadsheet would run
as formulas are escaped (`core.data.csv_export`, the rule every CSV download follows).
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any, Mapping

import numpy as np
import pandas as pd

from core.data.atomic import atomic_path
from core.data.csv_export import safe_csv
from core.smear.fields import POOLED  # the pooled row's `field`

TEMPLATE = Path(__file__).resolve().parent / "templates" / "sample_report.html"
NO_SAMPLE_ID = "no sample id given"
NOT_VERIFIED = "not verified"
STAGES = ("pre-classified", "verified")
CSV_COLUMNS = ["sample_id", "stage", "field", "white_cells", "judged", "verified", "removed", "blasts",
               "blast_fraction", "blast_fraction_low", "blast_fraction_high", "call", "model", "verifiers",
               "verified_at", "created_at"]
INT_COLUMNS = ["white_cells", "judged", "verified", "removed", "blasts"]  # counts: blank, never 5.0, when absent
MAX_THUMBNAILS = 48  # a printed page of small crops; more would bury the figures
THUMBNAIL_PX = 96
SHA_PREFIX = 16

# --- the model card's figures on data the model never saw --------------------------------------------------------
LAB_NAMES = {"allidb": "ALL-IDB1", "aria": "Aria et al. (Taleqani Hospital)", "bccd": "BCCD"}


def _num(value: Any, digits: int = 3) -> str | None:
    """A figure as text, or None when it is missing or not a number (a lab without blasts photos has no
    sensitivity: the report says nothing rather than 'nan')."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else f"{v:.{digits}f}"


def _ratio(text: Any) -> tuple[int, int] | None:
    """'23/24' -> (23, 24); None for anything else or a zero denominator."""
    try:
        a, b = (int(x) for x in str(text).split("/"))
    except ValueError:
        return None
    return (a, b) if b else None


def _lab_line(lab: str, f: Mapping) -> str:
    """One lab's cross-validated figures by photo in one line (photo calls first: what a field report is)."""
    parts = [f"{f['photos']} photos" if f.get("photos") is not None else ""]
    on_blasts, on_normal = _ratio(f.get("blasts_photos_called_blasts")), _ratio(f.get("no_blasts_photos_called_blasts"))
    if on_blasts:
        parts.append(f"blasts photos called blasts {on_blasts[0]}/{on_blasts[1]}")
    if on_normal:
        parts.append(f"no-blasts photos called blasts {on_normal[0]}/{on_normal[1]}")
    if on_blasts and on_normal and _num(f.get("balanced_accuracy")):
        parts.append(f"balanced accuracy {_num(f['balanced_accuracy'])}")
    else:
        parts += [f"{k} {_num(f.get(k))}" for k in ("sensitivity", "specificity") if _num(f.get(k))]
    if f.get("cannot_judge"):
        parts.append(f"{f['cannot_judge']} photos cannot judge")
    if f.get("cells") is not None and _num(f.get("cells_judged_share")):
        parts.append(f"{f['cells']} cells, {float(f['cells_judged_share']):.1%} judged")
    cell = [f"{label} {_num(f.get(k))}" for k, label in (("cell_sensitivity", "sensitivity"),
            ("cell_specificity", "specificity"), ("cell_roc_auc", "ROC AUC")) if _num(f.get(k))]
    if cell:
        parts.append("annotated cells: " + ", ".join(cell))
    return f"{LAB_NAMES.get(lab, lab)}: " + "; ".join(p for p in parts if p)


def _method_of(card: Mapping) -> str | None:
    """Which of a starter-style card's leave-subjects-out methods is the shipped model: its members' recipes
    joined by '+' (an ensemble), else its recipe's preset."""
    recipes = [m.get("recipe") for m in card.get("members") or [] if isinstance(m, Mapping) and m.get("recipe")]
    if recipes:
        return "+".join(dict.fromkeys(recipes))
    return (card.get("recipe") or {}).get("preset")


def card_figures(card: Mapping | None) -> list[str]:
    """A model's figures on data it never saw, in a few plain lines pulled from its card (card.json): the
    independent check on new patients (or that there is none yet), the cross-validation by photo per lab (smear
    models), the leave-subjects-out cross-validation of the shipped method (single-cell models), a lab refit's
    before / after. Why: a sample's figures mean little without how often the model is right on data it never
    saw, and the report must not claim more than the card does."""
    from core.decide.model_folder import independent_check_summary

    if not card:
        return ["No model card: there are no figures on data this model never saw."]
    lines = [independent_check_summary(dict(card)).replace("**", "")]
    cv = card.get("cross_validation") or {}
    if isinstance(cv.get("per_lab"), Mapping) and cv["per_lab"]:
        lines.append(f"{cv.get('folds', '?')}-fold cross-validation by {cv.get('by', 'photo')} (every figure on "
                     "photos the model never saw), per lab:")
        lines += [f"  {_lab_line(lab, f)}" for lab, f in cv["per_lab"].items() if isinstance(f, Mapping)]
        if cv.get("note"):
            lines.append(f"  Note: {cv['note']}.")
    lso = card.get("leave_subjects_out") or {}
    method = _method_of(card)
    pooled = ((lso.get("methods") or {}).get(method) or {}).get("pooled") if method else None
    if isinstance(pooled, Mapping):
        ci = pooled.get("ci95") or {}
        figs = []
        for key, label in (("weighted_f1", "weighted F1"), ("balanced_accuracy", "balanced accuracy"),
                           ("sensitivity_all", "sensitivity"), ("specificity_all", "specificity"),
                           ("roc_auc", "ROC AUC")):
            if _num(pooled.get(key)):
                bounds = ci.get(key) or []
                interval = (f" (95% CI {_num(bounds[0])}–{_num(bounds[1])})"
                            if len(bounds) == 2 and _num(bounds[0]) and _num(bounds[1]) else "")
                figs.append(f"{label} {_num(pooled[key])}{interval}")
        lines.append(f"{lso.get('folds', '?')}-fold leave-subjects-out cross-validation ({method}; patients each "
                     f"fold model never saw, from the training data's batch): " + ", ".join(figs)
                     + f"; {pooled.get('cells', '?')} cells of {pooled.get('subjects', '?')} subjects.")
    adaptation = card.get("adaptation") or {}
    if adaptation:
        lines.append(f"Refitted for {adaptation.get('lab', 'a lab')} ({adaptation.get('folds', '?')}-fold "
                     "cross-validation by photo of that lab's photos):")
        for when in ("before", "after"):
            for lab, f in (adaptation.get(when) or {}).items():
                lines.append(f"  {when}: {_lab_line(lab, f)}")
    if len(lines) == 1:
        lines.append("Its card holds no cross-validated figures.")
    return lines


# --- formatting ---------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """Escaped text of any value (None -> '')."""
    return html.escape("" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value))


def _int(value: Any) -> int | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else int(v)


def percent(value: Any) -> str:
    """A fraction as a percentage with one decimal ('42.9%'), '—' when undefined (no judged cell)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(v) else f"{v * 100:.1f}%"


def blast_share(row: Mapping) -> str:
    """'30.0% (95% CI 10.8–60.3%)', or '—' without a judged cell."""
    if not _int(row.get("judged")):
        return "—"
    return (f"{percent(row.get('blast_fraction'))} (95% CI {percent(row.get('blast_fraction_low'))[:-1]}–"
            f"{percent(row.get('blast_fraction_high'))})")


def _field_label(name: Any) -> str:
    """A field's name as the report shows it: the file's name, never its folder (a local path says nothing to the
    reader and may say too much)."""
    text = str(name)
    return text if text == POOLED else Path(text).name or text


def _headline(readout: pd.DataFrame | None) -> str:
    """The pooled row in one escaped line: call, blasts of judged, share with CI, and why."""
    if readout is None or not len(readout):
        return f"<span class='muted'>{NOT_VERIFIED}</span>"
    row = readout.iloc[-1].to_dict()
    share = f"; blast share {_e(blast_share(row))}" if _int(row.get("judged")) else ""
    return (f"<b class='{_call_class(row.get('call'))}'>{_e(row.get('call'))}</b>: {_e(_int(row.get('blasts')))} "
            f"blasts among {_e(_int(row.get('judged')))} judged of {_e(_int(row.get('white_cells')))} white cells "
            f"found{share}. <span class='muted'>{_e(row.get('why'))}</span>")


def _call_class(call: Any) -> str:
    return {"blasts": "call-blasts", "cannot judge": "call-cannot"}.get(str(call), "")


def _readout_table(readout: pd.DataFrame, verified: bool) -> str:
    """The read-out as an HTML table, every cell escaped; the pooled (last) row in bold."""
    heads = ["field", "white cells found", "judged", *(["verified", "removed"] if verified else ["review"]),
             "blasts", "blast % (95% CI)", "call", "why"]
    text = {"field", "call", "why"}
    out = ["<table><thead><tr>" + "".join(f"<th class='{'text' if h in text else ''}'>{h}</th>" for h in heads)
           + "</tr></thead><tbody>"]
    for i, row in enumerate(readout.to_dict("records")):
        counts = ["white_cells", "judged", *(["verified", "removed"] if verified else ["review"]), "blasts"]
        cells = [f"<td class='text'>{_e(_field_label(row.get('field')))}</td>",
                 *(f"<td>{_e(_int(row.get(c)))}</td>" for c in counts),
                 f"<td class='share'>{_e(blast_share(row))}</td>",
                 f"<td class='text {_call_class(row.get('call'))}'>{_e(row.get('call'))}</td>",
                 f"<td class='text'>{_e(row.get('why'))}</td>"]
        pooled = i == len(readout) - 1 and str(row.get("field")) == POOLED
        out.append(("<tr class='pooled'>" if pooled else "<tr>") + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _png_uri(image: np.ndarray, size: int = THUMBNAIL_PX) -> str:
    """A small PNG data URI of a crop (fits in size × size, aspect kept)."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnails(thumbnails: Mapping[str, np.ndarray] | None, called: int | None) -> str:
    """The blast cells' thumbnail grid (at most MAX_THUMBNAILS); `called`: how many cells the model called blast
    in all (the pooled read-out's count), so a grid cut short says how many it leaves out."""
    items = list((thumbnails or {}).items())
    called = max(called or 0, len(items))
    if not items:
        if not called:
            return "<p>No cell was called blast.</p>"
        return f"<p class='muted'>{called} cell{'s' if called != 1 else ''} called blast; no thumbnails given.</p>"
    shown = items[:MAX_THUMBNAILS]
    figures = "".join(f"<figure><img src='{_png_uri(img)}' alt='{_e(name)}'><figcaption>{_e(name)}</figcaption>"
                      "</figure>" for name, img in shown)
    more = (f"<p class='muted'>{called - len(shown)} more cells called blast are not shown.</p>"
            if called > len(shown) else "")
    return (f"<p>{called} cell{'s' if called != 1 else ''} called blast by the model (pre-classification); "
            f"{len(shown)} shown.</p><div class='grid'>{figures}</div>{more}")


@dataclass
class Verification:
    """Who verified a sample and when: distinct verifiers in order, decisions recorded, the latest time."""

    verifiers: list[str]
    decisions: int
    cells: int
    latest: str  # ISO 8601, '' without a decision

    @property
    def who(self) -> str:
        return "; ".join(self.verifiers)


def verification_facts(verifications: pd.DataFrame | None) -> Verification:
    """The verifiers, the count of decisions and of cells decided, and the time of the last decision from the run
    store's `verifications(sample)` table (columns verifier, at, cell_name; times as ISO strings)."""
    if verifications is None or not len(verifications):
        return Verification([], 0, 0, "")
    v = verifications
    who = [str(x).strip() for x in v.get("verifier", pd.Series(dtype=object)).dropna()]
    at = pd.to_datetime(v.get("at", pd.Series(dtype=object)), utc=True, errors="coerce").dropna()
    latest = at.max().strftime("%Y-%m-%dT%H:%M:%SZ") if len(at) else ""
    cells = int(v["cell_name"].nunique()) if "cell_name" in v else len(v)
    return Verification(list(dict.fromkeys(w for w in who if w)), int(len(v)), cells, latest)


def _stage_rows(readout: pd.DataFrame, stage: str, sample_id: str, model: str, verifiers: str, verified_at: str,
                created_at: str) -> list[dict]:
    rows = []
    for r in readout.to_dict("records"):
        rows.append({"sample_id": sample_id, "stage": stage, "field": _field_label(r.get("field")),
                     "white_cells": _int(r.get("white_cells")), "judged": _int(r.get("judged")),
                     "verified": _int(r.get("verified")) if stage == "verified" else None,
                     "removed": _int(r.get("removed")) if stage == "verified" else None,
                     "blasts": _int(r.get("blasts")), "blast_fraction": r.get("blast_fraction"),
                     "blast_fraction_low": r.get("blast_fraction_low"),
                     "blast_fraction_high": r.get("blast_fraction_high"), "call": r.get("call"),
                     "model": model,
                     "verifiers": verifiers if stage == "verified" else "",
                     "verified_at": verified_at if stage == "verified" else "", "created_at": created_at})
    return rows


@dataclass
class SampleReport:
    """A sample's report: the printable page (`html`), the same figures as CSV text (`csv`, formula-safe) and as a
    table (`rows`, unescaped: one row per stage and field)."""

    html: str
    csv: str
    rows: pd.DataFrame

    def write(self, html_path: str | Path) -> tuple[Path, Path]:
        """Write the page to `html_path` and the CSV beside it (same stem, `.csv`); returns both paths. Written
        through a temporary file so a reader never sees half a report."""
        page = Path(html_path)
        table = page.with_suffix(".csv")
        for path, text in ((page, self.html), (table, self.csv)):
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return page, table


def sample_report(sample_id: str, readout: pd.DataFrame, *, verified: pd.DataFrame | None = None,
                  verifications: pd.DataFrame | None = None, model: str, model_sha256: str = "",
                  card: dict | None = None, blast_thumbnails: Mapping[str, np.ndarray] | None = None,
                  made_by: str = "", now: datetime | None = None) -> SampleReport:
    """The printable report of one sample (one smear upload).

    `sample_id`: what the user typed, shown as is (escaped); never derived from file names, so an empty one says
    "no sample id given". `readout`: the pre-classified read-out (`core.smear.fields.field_readout`: one row per
    field, the pooled row last); `verified`: the same after verification (`core.smear.verify.verified_readout`,
    with `verified` and `removed`), or None ("not verified"); `verifications`: the run store's decisions of this
    sample (verifiers and the latest time). `model` / `model_sha256` / `card`: which model judged, and its card's
    figures on data it never saw (`card_figures`). `blast_thumbnails`: cell name -> crop of the cells called blast
    (the first MAX_THUMBNAILS drawn). `made_by` and `now` (default: the current UTC time): who made it, when."""
    now = now or datetime.now(timezone.utc)
    created_at = now.isoformat(timespec="seconds")
    created_text = now.strftime("%Y-%m-%d %H:%M:%S") + (f" {now.tzname()}" if now.tzinfo else "")
    has_id = bool(sample_id and sample_id.strip())
    facts = verification_facts(verifications)
    sha = (model_sha256 or "").strip()
    model_short = f"{model} (SHA-256 {sha[:SHA_PREFIX]}…)" if sha else f"{model} (SHA-256 not given)"
    card = card or {}

    fields = [_field_label(f) for f in readout["field"] if str(f) != POOLED]
    sample_html = _e(sample_id) if has_id else f"<i>{NO_SAMPLE_ID}</i>"
    if verified is not None and len(verified):
        last = verified.iloc[-1]
        verified_section = (f"<p class='muted'>{_e(_int(last.get('verified')))} of "
                            f"{_e(_int(readout.iloc[-1].get('white_cells')) if len(readout) else 0)} white cells "
                            "verified by a person; cells nobody verified keep their pre-classification; "
                            "removed: cells a verifier said were not white cells.</p>"
                            + _readout_table(verified, verified=True))
    else:
        verified_section = f"<p><b>{NOT_VERIFIED}</b>: no person has verified this sample's cells.</p>"
    if facts.decisions:
        verifiers_line = (f"{_e(facts.who) or 'unnamed'}; {facts.decisions} decision"
                          f"{'s' if facts.decisions != 1 else ''} on {facts.cells} cell"
                          f"{'s' if facts.cells != 1 else ''}; last at {_e(facts.latest) or 'unknown time'}")
        verification_section = (f"<p>Verified by {_e(facts.who) or 'unnamed'}. {facts.decisions} decisions on "
                                f"{facts.cells} cells were recorded; the last at {_e(facts.latest) or 'unknown time'}"
                                ". Every decision is kept in the run store's audit trail.</p>")
    else:
        verifiers_line = NOT_VERIFIED
        verification_section = f"<p>{NOT_VERIFIED.capitalize()}: no verification decision is recorded.</p>"
    thumbs = _thumbnails(blast_thumbnails, _int(readout.iloc[-1].get("blasts")) if len(readout) else 0)
    not_for = card.get("not_for") or []
    rule = readout.attrs.get("rule")
    page = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title_sample=_e(sample_id) if has_id else NO_SAMPLE_ID,
        sample_id=sample_html,
        field_names=_e(", ".join(fields)) or "<i>no field</i>",
        pre_headline=_headline(readout),
        verified_headline=_headline(verified if verified is not None and len(verified) else None),
        model_line=(_e(model_short) + (f"; card <code>{_e(card.get('name'))}</code>" if card.get("name") else "")),
        model_short=_e(model_short),
        verifiers_line=verifiers_line,
        created_line=_e(created_text) + (f" by {_e(made_by)}" if made_by else " (maker not given)"),
        rule_line=f"Call rule: {_e(rule)}." if rule else "",
        pre_table=_readout_table(readout, verified=False),
        verified_section=verified_section,
        card_figures="\n".join(f"<li>{_e(line.strip())}</li>" if not line.startswith("  ") else
                               f"<li style='margin-left:1.2em;list-style:circle'>{_e(line.strip())}</li>"
                               for line in card_figures(card)),
        not_for=(f"<p class='muted'>Not for: {_e('; '.join(map(str, not_for)))}.</p>" if not_for else ""),
        verification_section=verification_section,
        thumbnails=thumbs,
    )
    sid = sample_id if has_id else ""
    rows = _stage_rows(readout, STAGES[0], sid, model, "", "", created_at)
    if verified is not None and len(verified):
        rows += _stage_rows(verified, STAGES[1], sid, model, facts.who, facts.latest, created_at)
    table = pd.DataFrame(rows, columns=CSV_COLUMNS).astype({c: "Int64" for c in INT_COLUMNS})
    return SampleReport(page, safe_csv(table), table)


def blast_crops(table: pd.DataFrame, limit: int = MAX_THUMBNAILS) -> dict[str, np.ndarray]:
    """Cell name -> crop of the cells the model called blast (prediction `all`), read from the crop files a
    `predict --fields` table points at (`path`); at most `limit`, unreadable files skipped. Why files: the CLI
    writes each cell's crop to the --fields folder before judging it, so the report shows exactly what was judged."""
    from PIL import Image

    out: dict[str, np.ndarray] = {}
    if "prediction" not in table or "path" not in table:
        return out
    for path in table.loc[table["prediction"] == "all", "path"].dropna():
        if len(out) >= limit:
            break
        try:
            with Image.open(path) as im:
                out[Path(str(path)).name] = np.asarray(im.convert("RGB"))
        except OSError:
            continue
    return out


def report_paths(html_path: str | Path) -> tuple[Path, Path]:
    """Where a report goes: the page and its CSV beside it (same stem, `.csv`)."""
    page = Path(html_path)
    return page, page.with_suffix(".csv")
