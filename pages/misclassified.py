"""Misclassified: galleries of false positives and false negatives, filterable, with Grad-CAM."""
from pathlib import Path

import streamlit as st

from dashboard import auth, services, widgets
from dashboard.csv_export import safe_csv
from dashboard.settings import Settings

PAGE = 24


@st.cache_resource(show_spinner="Loading model…")
def run_bundle(run_id: str, runs_dir: str):
    return services.load_run_bundle(run_id, runs_dir)


@st.dialog("Cell", width="large")
def enlarge(path: str, runs_dir: str, run_id: str) -> None:
    crop, over = services.cell_view(path, 250, run_bundle(run_id, runs_dir))
    st.image([crop, over], caption=["crop (250 px)", "Grad-CAM: blast evidence"], width=340)
    st.caption(path)


def filters_ui(table):
    c1, c2, c3, c4 = st.columns(4)
    kinds = c1.multiselect("Error", ["false_positive", "false_negative"], ["false_positive", "false_negative"],
                           help="false positive: a normal (hem) cell called a blast; false negative: a missed blast")
    subjects = c2.multiselect("Subject", sorted(table["subject"].dropna().unique()))
    lo, hi = c3.slider("Confidence of the wrong call", 0.0, 1.0, (0.0, 1.0), 0.01)
    order = c4.selectbox("Sort", ["most confident first", "least confident first"])
    view = table[table["error"].isin(kinds) & table["confidence"].between(lo, hi)]
    if subjects:
        view = view[view["subject"].isin(subjects)]
    return view.sort_values("confidence", ascending=order.startswith("least"))


def main() -> None:
    settings = Settings.from_env()
    actor = auth.current_actor()  # signed in (or local mode), else the sign-in page and a stop
    st.title("Misclassified cells")
    widgets.reviewer_ui(actor)
    runs = services.completed_runs(settings.runs_dir)
    if runs.empty:
        st.info("No completed run yet.")
        return
    labels = {services.run_label(r): r["id"] for r in runs.to_dict("records")}
    run_id = labels[st.selectbox("Run", list(labels))]
    table = services.errors(settings.runs_dir, run_id, settings.data_roots)
    fp, fn = (table["error"] == "false_positive").sum(), (table["error"] == "false_negative").sum()
    st.caption(f"Test split of run {run_id}: {fp} false positives, {fn} false negatives "
               "(at the run's decision threshold).")
    scope = services.error_scope(settings.runs_dir, run_id)
    if scope:  # a one-class test split: the absence of the other kind of error means nothing
        st.warning(scope)
    if table["missing"].any():
        st.warning(f"{int(table['missing'].sum())} of these cells are missing from disk (moved or deleted); "
                   "a moved dataset is found again when it lies under one of the data roots (CNMC_DATA_ROOTS).")
    view = filters_ui(table)
    st.download_button("Export this list (CSV)", safe_csv(view), f"errors_{run_id}.csv", "text/csv")
    overrides = services.label_overrides(settings.runs_dir)
    if not actor.can("export_overrides"):
        st.caption(actor.refusal("export_overrides"))
    else:
        st.download_button(f"Export label overrides ({len(overrides)} corrected labels, CSV)",
                           safe_csv(overrides, services.OVERRIDE_FREE_TEXT), "label_overrides.csv", "text/csv",
                           help="every cell whose latest review says 'label is wrong', with its corrected label: "
                                "train with it (Train page, or `run --label-overrides FILE`)")
    gradcam = st.toggle("Grad-CAM overlay", value=False)
    if view.empty:
        st.success("No misclassified cells match the filters.")
        return
    bundle = run_bundle(run_id, str(settings.runs_dir)) if gradcam else None
    cols = st.columns(6)
    for i, row in enumerate(view.head(PAGE).itertuples()):
        caption = f"{row.error.replace('_', ' ')} · {row.subject} · P(blast) {row.prob_all:.2f}"
        with cols[i % 6]:
            if row.missing:
                st.markdown(f"**missing** · {caption}")
                st.caption(row.path)
                continue
            crop, over = services.cell_view(row.path, 160, bundle)
            st.image(over if gradcam else crop, width="stretch", caption=caption)
            if st.button("Enlarge", key=f"big-{i}"):
                enlarge(row.path, str(settings.runs_dir), run_id)
            widgets.review_label_ui(settings.runs_dir, Path(row.path).name, row.label, str(i), run_id, row.path,
                                    actor)
    if len(view) > PAGE:
        st.caption(f"Showing {PAGE} of {len(view)}; narrow the filters or export the list.")


main()
