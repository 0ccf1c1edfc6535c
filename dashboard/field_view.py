"""Classify's smear-field section: the field with numbered outlines coloured by call, a per-field summary, the
cells' table (box, mask area, call) with a CSV download, and a gallery of the crops (drawing only)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core.fields import CALL_COLOURS

TABLE_COLUMNS = ["cell", "call", "prediction", "calibrated_prob_blast", "ood_reason", "x0", "y0", "x1", "y1",
                 "mask_area_px"]


def field_options_ui() -> tuple[bool, bool]:
    """(treat every upload as a field, normalise the crops' stain toward C-NMC's)."""
    as_fields = st.toggle("Uploads are smear fields: find and classify every white cell", value=False,
                          help="fields the out-of-distribution gate recognises are segmented in any case")
    normalize = st.toggle("Bring the field cells' stain toward C-NMC's (Reinhard colour transfer)", value=False,
                          help="other labs' stains differ from C-NMC's; the gate still judges every cell")
    return as_fields, normalize


def _legend() -> str:
    return " · ".join(f"<span style='color:rgb{rgb}'>■</span> {call}" for call, rgb in CALL_COLOURS.items())


def fields_ui(fields: list, gradcam: bool, overlays: dict) -> None:
    """One block per uploaded field; cells the gate refuses are listed as not assessed, with the reason."""
    st.subheader(f"Smear fields ({len(fields)})")
    st.caption("White cells are segmented from the field, cut out on black at C-NMC's scale (red cells are the "
               "ruler) and each classified like an uploaded cell. Fields from other labs differ from C-NMC in "
               "stain, magnification and camera: every cell still passes the out-of-distribution gate.")
    for fc in fields:
        with st.container(border=True):
            st.markdown(f"**{fc.name}**")
            if fc.error:
                st.error(fc.error)
                continue
            s = fc.summary
            cols = st.columns(5)
            cols[0].metric("White cells found", s["cells_found"])
            cols[1].metric("Blasts", s["blasts"], help="cells called blast (all) among the assessed ones")
            cols[2].metric("Blast fraction", f"{s['blast_fraction']:.0%}" if s["assessed"] else "–")
            cols[3].metric("To review", s["review"], help="calls within the review band of the threshold")
            cols[4].metric("Not assessed", s["not_assessed"])
            cut = s["cut_by_border"]
            for note in fc.notes + ([f"{cut} cell{'s' if cut > 1 else ''} cut by the image border "
                                     f"{'were' if cut > 1 else 'was'} left out"] if cut else []):
                st.caption(note)
            st.image(fc.overlay, caption=f"{fc.name}: outlines coloured by call", width="stretch")
            st.markdown(_legend(), unsafe_allow_html=True)
            table = fc.table.rename(columns={"prob_all_calibrated": "calibrated_prob_blast"})
            for row in table[table["out_of_distribution"] == True].itertuples():  # noqa: E712
                st.warning(f"cell {row.cell}: not assessed: {row.ood_reason}")
            st.dataframe(table[[c for c in TABLE_COLUMNS if c in table]], hide_index=True, width="stretch")
            st.download_button("Download this field's cells (CSV)", table.to_csv(index=False),
                               f"{fc.name}-cells.csv", "text/csv", key=f"field-csv-{fc.name}")
            gallery_ui(table, fc.crops, overlays if gradcam else {})


def gallery_ui(table: pd.DataFrame, crops: dict, overlays: dict) -> None:
    cols = st.columns(6)
    for i, row in enumerate(table.itertuples()):
        with cols[i % 6]:
            image = overlays.get(row.cell_name, crops.get(row.cell_name))
            if image is not None:
                st.image(image, caption=f"cell {row.cell}: {row.call}", width="stretch")
