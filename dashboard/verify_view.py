"""Classify's verification of a smear upload (one sample), as a technologist verifies a digital-morphology
system's pre-classified cells: every white cell found is a tile, least certain first; one cell at a time gets a
decision from five buttons, each with its one-key shortcut (y, b, n, x, u); the counts as pre-classified and as
verified update as you go. Decisions live in the run store with who made them and when, so another session (or
re-opening the same photos) sees them; then the report, the QuPath GeoJSON and the crops to download (drawing
only: the numbers come from `dashboard.services`)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.smear.verify import DECISIONS, SHORTCUTS, verified_class
from dashboard import services
from dashboard.auth import Actor

TILES = 6  # tiles per row
MAX_TILES = 120  # tiles drawn; the queue itself holds every cell
LABELS = {"confirm": "Confirm", "blast": "Blast", "normal": "Normal", "not a white cell": "Not WBC", "unsure": "Unsure"}
HELP = {"confirm": "confirm the model's call", "blast": "a blast", "normal": "a normal white cell",
        "not a white cell": "not a white cell: debris, smudge, platelet clump", "unsure": "cannot tell"}
CURRENT = "_cnmc_verify_current"  # session state: the cell under the verifier's eye


def verify_ui(result: services.Classified, runs_dir, actor: Actor) -> None:
    """The whole loop for the upload's fields: counts, the cell to decide, the tiles, then report and exports."""
    cells = services.field_cells(result)
    if cells.empty:
        return
    ver = services.verification(runs_dir, services.sample_of(result))
    st.subheader(f"Verify this sample: {len(cells)} white cell{'s' if len(cells) != 1 else ''} in "
                 f"{len(result.fields)} smear photo{'s' if len(result.fields) != 1 else ''}")
    st.caption("Each white cell found, least certain first. A count is signed off only after a person has looked "
               "at its cells; your decisions are stored with your name and the time, and anyone re-opening these "
               "photos sees them. Keys: " + " · ".join(f"**{k}** {HELP[d]}" for d, k in SHORTCUTS.items()))
    counts_ui(result, ver)
    refused = actor.refusal("review")
    if refused:
        st.info(f"Verification: {refused}")
    else:
        decide_ui(result, cells, ver, runs_dir, actor)
    tiles_ui(cells, services.cell_crops(result), ver)
    report_ui(result, ver, actor)


def counts_ui(result: services.Classified, ver: services.Verification) -> None:
    """Pooled counts, pre-classified beside verified."""
    pre = result.field_readout.iloc[-1]
    post = services.verified_readout(result, ver.decisions).iloc[-1]
    cols = st.columns(5)
    cols[0].metric("White cells", int(post["white_cells"]), delta=int(post["white_cells"] - pre["white_cells"]) or None,
                   help="found by segmentation; cells a verifier called 'not a white cell' leave the count")
    cols[1].metric("Verified", f"{int(post['verified'])} / {int(pre['white_cells'])}")
    cols[2].metric("Blasts, pre-classified", int(pre["blasts"]))
    cols[3].metric("Blasts, verified", int(post["blasts"]), delta=int(post["blasts"] - pre["blasts"]) or None,
                   delta_color="off")
    cols[4].metric("Blast %, verified", f"{post['blast_fraction']:.0%}" if post["judged"] else "–",
                   help="verified blasts among the judged cells; its 95% CI (Wilson) is said below")
    ci = (f" Blast % {post['blast_fraction']:.0%}, 95% CI {post['blast_fraction_low']:.0%}–"
          f"{post['blast_fraction_high']:.0%}." if post["judged"] else "")
    st.caption(f"Verified call: **{post['call']}**: {post['why']}.{ci}"
               + (f" Verified by {', '.join(ver.verifiers)}." if ver.verifiers else " Not verified yet."))
    if ver.disputed:
        st.warning(f"{len(ver.disputed)} cell{'s' if len(ver.disputed) > 1 else ''} where verifiers disagree (the "
                   "latest decision counts; every decision is kept): "
                   + "; ".join(f"{c}: {', '.join(w)}" for c, w in list(ver.disputed.items())[:10]))


def _next_cell(cells: pd.DataFrame, ver: services.Verification) -> str | None:
    todo = [n for n in cells["cell_name"] if n not in ver.decisions]
    return todo[0] if todo else None


def decide_ui(result: services.Classified, cells: pd.DataFrame, ver: services.Verification, runs_dir,
              actor: Actor) -> None:
    """The cell under the eye, large, with the five decisions; the next undecided cell follows each decision."""
    names = list(cells["cell_name"])
    current = st.session_state.get(CURRENT)  # a tile picked (to change a decision), else the next undecided cell
    if current not in names:
        current = _next_cell(cells, ver)
    if current is None:
        st.success("Every cell of this sample has a decision. Pick a cell below to change one.")
        current = st.selectbox("Cell", names, key="verify-pick")
    row = cells[cells["cell_name"] == current].iloc[0].to_dict()
    left, right = st.columns([1, 2])
    crop = services.cell_crops(result).get(current)
    if crop is not None:
        left.image(crop, caption=current, width="stretch")
    p = row.get("prob_all_calibrated")
    right.markdown(f"**{current}** · {row['field']} · cell {row['cell']}  \n"
                   f"Pre-classified: **{row['call']}**" + (f", calibrated P(blast) {p:.2f}" if pd.notna(p) else "")
                   + (f" ({row['ood_reason']})" if isinstance(row.get("ood_reason"), str) else "")
                   + (f"  \nCurrent decision: **{ver.decisions[current]}**" if current in ver.decisions else ""))
    who = actor.named(st.session_state.get("reviewer", ""))
    buttons = right.columns(len(DECISIONS))
    for col, decision in zip(buttons, DECISIONS):
        if col.button(LABELS[decision], key=f"verify-{decision}", shortcut=SHORTCUTS[decision],
                      type="primary" if decision == "confirm" else "secondary", width="stretch"):
            _decide(result, runs_dir, current, decision, who)


def _decide(result, runs_dir, cell: str, decision: str, who: Actor) -> None:
    try:
        services.verify_cell(runs_dir, result, cell, decision, actor=who)
    except (ValueError, services.PermissionDenied, services.StoreUnavailable) as exc:
        st.error(str(exc))
        return
    st.session_state.pop(CURRENT, None)
    st.rerun()


def tiles_ui(cells: pd.DataFrame, crops: dict, ver: services.Verification) -> None:
    """Every cell as a tile, least certain first: its pre-classified call and, once verified, the decision."""
    with st.expander(f"All {len(cells)} cells, least certain first", expanded=len(cells) <= 24):
        cols = st.columns(TILES)
        for i, row in enumerate(cells.head(MAX_TILES).to_dict("records")):
            decision = ver.decisions.get(row["cell_name"])
            now = verified_class(row, decision) if decision else None
            tail = f" → {decision}" + (f" ({now})" if decision == "confirm" and now else "") if decision else ""
            with cols[i % TILES]:
                if row["cell_name"] in crops:
                    st.image(crops[row["cell_name"]], width="stretch")
                if st.button(f"{row['cell']}·{row['call']}{tail}", key=f"tile-{row['cell_name']}",
                             help=f"{row['cell_name']}: verify this cell next", width="stretch"):
                    st.session_state[CURRENT] = row["cell_name"]
                    st.rerun()
        if len(cells) > MAX_TILES:
            st.caption(f"Tiles for the first {MAX_TILES} cells; the queue above goes through all {len(cells)}.")


def report_ui(result: services.Classified, ver: services.Verification, actor: Actor) -> None:
    """The report (printable HTML and CSV) with a typed sample id, and the exports for other tools."""
    st.markdown("**Report and exports**")
    with st.form("sample-report", border=False):  # the id is taken as a whole, before a download is built
        sample_id = st.text_input("Sample id (typed by you; never taken from file names)", key="sample-id",
                                  placeholder="e.g. the lab's accession number; Enter to set it")
        st.form_submit_button("Set the sample id")
    report = services.sample_report(result, sample_id, ver, actor=actor, card=services.smear_card(result))
    cols = st.columns(4)
    cols[0].download_button("Download the report (HTML, printable)", report.html, "sample_report.html",
                            "text/html", key="report-html", on_click="ignore")
    cols[1].download_button("Download the report's figures (CSV)", report.csv, "sample_report.csv", "text/csv",
                            key="report-csv", on_click="ignore")
    read = [fc for fc in result.fields if fc.error is None]
    qupath = "one FeatureCollection per field: QuPath → File → Import objects; each white cell a detection classed " \
             "blast / normal / review / not judged, or as verified"
    if len(read) == 1:
        cols[2].download_button("Download outlines for QuPath (GeoJSON)",
                                lambda: services.field_geojson(result, read[0].name, ver.decisions),
                                f"{Path(read[0].name).stem}.geojson", "application/geo+json", key="geojson",
                                help=qupath, on_click="ignore")
    else:
        cols[2].download_button("Download outlines for QuPath (GeoJSON, zip)",
                                lambda: services.geojson_zip(result, ver.decisions), "qupath_geojson.zip",
                                "application/zip", key="geojson", help=qupath,
                                on_click="ignore")
    cols[3].download_button("Download the cell crops (zip)", lambda: services.field_crops_zip(result),
                            "cell_crops.zip", "application/zip", key="crops-zip",
                            on_click="ignore")
