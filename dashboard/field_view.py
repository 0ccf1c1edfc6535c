"""Classify's smear-field section: the read-out a pathologist asks for (white cells found, judged, blasts, blast
fraction with its 95% CI, the call and why) per field and pooled over the upload, then per field the outlined
field (legend), the cells' table (box, mask area, call) with a CSV download, and a gallery of the crops (drawing
only: the numbers come from `services.classify_uploads`)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core.smear.fields import CALL_COLOURS, POOLED, CallRule
from dashboard import services
from dashboard.csv_export import safe_csv

TABLE_COLUMNS = ["cell", "call", "prediction", "calibrated_prob_blast", "ood_reason", "x0", "y0", "x1", "y1",
                 "mask_area_px"]
# what each outline colour means, in a pathologist's words (the keys are core.smear.fields' cell states)
LEGEND = {"blast": "blast", "normal": "normal", "review": "review: judged, near the threshold (class in the table)",
          "not assessed": "not judged: outside what the model can judge"}
CALL_MARK = {"blasts": "red", "no blasts": "green", "cannot judge": "gray"}


def field_options_ui() -> tuple[bool, bool, bool, str | None]:
    """(treat every upload as a field, normalise the crops' stain toward C-NMC's, judge field cells with a smear
    model when one is installed, which one: the shipped one or a lab's refit)."""
    as_fields = st.toggle("Uploads are smear fields: find and classify every white cell", value=False,
                          help="an upload that is not one cell on a black background is segmented in any case; this "
                               "takes every upload as a field")
    normalize = st.toggle("Bring the field cells' stain toward C-NMC's (Reinhard colour transfer)", value=False,
                          help="other labs' stains differ from C-NMC's; the gate still judges every cell")
    use_smear = services.smear_available() and st.toggle(
        "Judge field cells with the shipped smear model", value=True,
        help="trained on white cells cut from smear photos (ALL-IDB, Aria's, BCCD) by the same segmentation; "
             "single cells go to the model chosen above")
    models = services.smear_models() if use_smear else {}
    choice = None
    if len(models) > 1:  # a lab's refits beside the shipped model
        choice = models[st.selectbox("Smear model for field cells", list(models),
                                     help="the shipped model, or a version refitted for a lab's own photos "
                                          "(`python -m training smear-model --base ...`)")]
    return as_fields, normalize, use_smear, choice


def _legend() -> str:
    return " · ".join(f"<span style='color:rgb{rgb}'>■</span> {LEGEND[call]}" for call, rgb in CALL_COLOURS.items())


def _fraction(row: dict) -> str:
    if not row["judged"]:
        return "–"
    return f"{row['blast_fraction']:.0%} ({row['blast_fraction_low']:.0%}–{row['blast_fraction_high']:.0%})"


def call_ui(row: dict) -> None:
    """The call in its colour and why, in words; the cells that made a blasts call by number."""
    cells = f" Blast cells: {row['blast_cells']}." if row["call"] == "blasts" and row["blast_cells"] else ""
    st.markdown(f"Call: **:{CALL_MARK[row['call']]}[{row['call']}]**: {row['why']}.{cells}")


def counts_ui(row: dict) -> None:
    cols = st.columns(5)
    cols[0].metric("White cells found", row["white_cells"])
    cols[1].metric("Judged", row["judged"], help="given a class (blast or normal) by the model; review-band calls "
                                                 "count with their class")
    cols[2].metric("Blasts", row["blasts"], help="judged cells called blast (all)")
    cols[3].metric("Blast fraction (95% CI)", _fraction(row),
                   help="blasts among the judged cells; Wilson score interval")
    cols[4].metric("To review", row["review"], help="calls within the review band of the threshold")


def readout_ui(readout: pd.DataFrame) -> None:
    """The pooled read-out (one upload: one patient) and the per-field table with its CSV."""
    rows = readout.to_dict("records")
    if len(rows) > 2:  # more than one field: the pooled row says something a field's own does not
        with st.container(border=True):
            st.markdown(f"**All {len(rows) - 1} fields of this upload, pooled**")
            call_ui(rows[-1])
            counts_ui(rows[-1])
    st.dataframe(readout, hide_index=True, width="stretch", column_config={
        c: st.column_config.NumberColumn(format="%.3f") for c in
        ("blast_fraction", "blast_fraction_low", "blast_fraction_high")})
    st.caption(f"Call rule: {readout.attrs.get('rule') or CallRule().describe()}.")
    st.download_button("Download the per-field read-out (CSV)", safe_csv(readout), "fields.csv",
                       "text/csv", key="field-readout-csv")


def fields_ui(fields: list, gradcam: bool, overlays: dict, readout: pd.DataFrame | None = None,
              model_note: str | None = None) -> None:
    """The read-out, then one block per uploaded field; cells the gate refuses are listed as not judged, with
    the reason; a field that gave no cell (or an unreadable upload meant as one) says why it cannot be judged."""
    rows = {} if readout is None or readout.empty else {
        r["field"]: r for r in readout.to_dict("records") if r["field"] != POOLED}
    st.subheader(f"Smear fields ({max(len(fields), len(rows))})")
    st.caption("White cells are segmented from the field, cut out on black at C-NMC's scale (red cells are the "
               "ruler) and each classified like an uploaded cell. Fields from other labs differ from C-NMC in "
               "stain, magnification and camera: every cell still passes the out-of-distribution gate.")
    if model_note:
        st.info(model_note)
    if rows:
        readout_ui(readout)
    done = set()
    for fc in fields:
        done.add(fc.name)
        with st.container(border=True):
            st.markdown(f"**{fc.name}**")
            if fc.name in rows:
                call_ui(rows[fc.name])
            if fc.error:
                st.warning(f"{fc.name}: {fc.error.removeprefix(fc.name + ': ')}")
                continue
            if fc.name in rows:
                counts_ui(rows[fc.name])
            cut = fc.summary["cut_by_border"]
            for note in fc.notes + ([f"{cut} cell{'s' if cut > 1 else ''} cut by the image border "
                                     f"{'were' if cut > 1 else 'was'} left out"] if cut else []):
                st.caption(note)
            st.image(fc.overlay, caption=f"{fc.name}: outlines coloured by call", width="stretch")
            st.markdown(_legend(), unsafe_allow_html=True)
            table = fc.table.rename(columns={"prob_all_calibrated": "calibrated_prob_blast"})
            for row in table[table["out_of_distribution"] == True].itertuples():  # noqa: E712
                st.warning(f"cell {row.cell}: not judged: {row.ood_reason}")
            st.dataframe(table[[c for c in TABLE_COLUMNS if c in table]], hide_index=True, width="stretch")
            st.download_button("Download this field's cells (CSV)", safe_csv(table),
                               f"{fc.name}-cells.csv", "text/csv", key=f"field-csv-{fc.name}")
            gallery_ui(table, fc.crops, overlays if gradcam else {})
    for name, row in rows.items():  # uploads meant as fields that could not be read
        if name not in done:
            with st.container(border=True):
                st.markdown(f"**{name}**")
                call_ui(row)


def gallery_ui(table: pd.DataFrame, crops: dict, overlays: dict) -> None:
    cols = st.columns(6)
    for i, row in enumerate(table.itertuples()):
        with cols[i % 6]:
            image = overlays.get(row.cell_name, crops.get(row.cell_name))
            if image is not None:
                st.image(image, caption=f"cell {row.cell}: {row.call}", width="stretch")
