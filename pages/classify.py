"""Classify: upload cells, pick a model, get classes, blast probabilities, review flags and Grad-CAM."""
import streamlit as st

from dashboard import auth, services, widgets
from dashboard.csv_export import safe_csv
from dashboard.field_view import field_options_ui, fields_ui
from dashboard.verify_view import verify_ui
from dashboard.settings import MAX_UPLOAD_FILES, Settings

IMAGE_TYPES = ["bmp", "png", "jpg", "jpeg", "tif", "tiff"]
MAX_CARDS = 48


@st.cache_resource(show_spinner="Loading the starter model…")
def starter_bundle():
    return services.load_starter_bundle()


@st.cache_resource(show_spinner="Loading the smear model…")
def smear_bundle(ref: str | None = None):
    return services.load_smear_bundle(ref)[0]


@st.cache_resource(show_spinner="Loading model…")
def run_bundle(run_id: str, runs_dir: str):
    return services.load_run_bundle(run_id, runs_dir)


@st.cache_resource(show_spinner="Loading model…", max_entries=4)
def uploaded_bundle(name: str, data: bytes):
    return services.load_uploaded_bundle(name, data)


STARTER, RUN, UPLOAD = "Starter model (real cells)", "Completed run", "Upload a .keras file"


def model_ui(settings: Settings, actor: auth.Actor):
    sources = ([STARTER] if services.starter_available() else []) + [RUN, UPLOAD]
    source = st.radio("Model", sources, horizontal=True)
    if source == STARTER:
        bundle, card = starter_bundle()
        st.info(services.model_quality("starter"))  # what to expect on new patients, before the card's CV figures
        with st.expander("Model card: what the starter model was trained on, how it was measured, its limits"):
            st.markdown(card or "No model card found.")
        return bundle
    if source == UPLOAD:
        up = st.file_uploader("Keras model (.keras, loaded in safe mode)", type=["keras"], key="model_file")
        if up is None:
            return None
        try:
            return uploaded_bundle(up.name, up.getvalue())
        except ValueError as exc:
            st.error(str(exc))
            return None
    runs = services.completed_runs(settings.runs_dir)
    if runs.empty:
        st.info("No trained model yet. Train the demo model (Solution A on the synthetic cells, a few minutes "
                "on a CPU) or train your own on the Train page.")
        if st.button("Train the demo model"):
            try:
                run_id = services.launch_demo(settings, actor=actor)
                st.success(f"Demo training started as run {run_id}; follow it on the Train page.")
            except (FileNotFoundError, services.PermissionDenied) as exc:
                st.error(str(exc))
        return None
    labels = {services.run_label(r): r["id"] for r in runs.to_dict("records")}
    return run_bundle(labels[st.selectbox("Run", list(labels))], str(settings.runs_dir))


def upload_ui():
    files = st.file_uploader("Cell images (BMP, PNG, JPEG, TIFF)", type=IMAGE_TYPES, accept_multiple_files=True,
                             key="cells", help=services.upload_limits())
    gradcam = st.toggle("Show Grad-CAM overlays (where the model sees blast evidence)", value=False)
    return files or [], gradcam, field_options_ui()


def results_ui(result, gradcam: bool, threshold: float, runs_dir, actor: auth.Actor) -> None:
    for row in result.table[result.table["error"].notna()].itertuples():
        st.error(f"{row.file}: {row.error}")
    read = result.table[result.table["error"].isna()]
    if st.toggle("Review queue: cells the model cannot judge first, then the least certain calls", value=False,
                 help="orders the table and the cards so an expert's time goes where the model is least sure"):
        read = services.review_order(read, threshold)
    refused = read[read["out_of_distribution"] == True]  # noqa: E712 - the column holds None for errors
    ok = read[read["out_of_distribution"] != True]  # noqa: E712
    flagged = int(ok["review_manually"].sum()) if len(ok) else 0
    cells = f"{len(ok)} cell{'' if len(ok) == 1 else 's'} classified"
    st.subheader(cells + (f", {flagged} to review manually" if flagged else "")
                 + (f", {len(refused)} not assessed" if len(refused) else ""))
    for row in refused.itertuples():
        st.warning(f"{row.file}: not assessed: {row.ood_reason}. The model gives no class to images unlike "
                   "the cells it was trained on.")
    if result.subject_corrected:
        st.info(f"{result.subject_corrected} calls also used the same subject's other uploaded cells (this model's "
                "per-subject correction, from UID_ file names): it assumes a subject's cells share one class, as in "
                "C-NMC, not as in a patient's blood.")
    st.dataframe(read.drop(columns=["error"]), hide_index=True, width="stretch",
                 column_config={"prob_blast": st.column_config.ProgressColumn("P(blast)", min_value=0, max_value=1),
                                "calibrated_prob_blast": st.column_config.NumberColumn("calibrated P(blast)",
                                                                                       format="%.3f")})
    st.download_button("Download results (CSV)", safe_csv(result.table), "classification.csv",
                       "text/csv")
    if not result.subjects.empty:
        st.subheader("Per subject (from UID_ file names)")
        st.dataframe(result.subjects, hide_index=True)
    widgets.cell_cards_ui(read, result.crops, result.overlays if gradcam else {}, runs_dir, MAX_CARDS, actor)


def audit_ui(settings: Settings, actor: auth.Actor) -> None:
    if not actor.can("audit"):
        st.caption(actor.refusal("audit"))
        return
    trail = services.audit_trail(settings.runs_dir, actor=actor)
    st.download_button(f"Download the audit trail ({len(trail)} classifications, CSV)", safe_csv(trail),
                       "audit_trail.csv", "text/csv", help="every classification made here or with the CLI: time, "
                       "model and its hash, file name and SHA-256, result, rule; uploaded pixels are not kept")


def main() -> None:
    settings = Settings.from_env()
    actor = auth.current_actor()  # signed in (or local mode), else the sign-in page and a stop
    st.title("Classify cells")
    widgets.reviewer_ui(actor)
    bundle = model_ui(settings, actor)
    files, gradcam, (as_fields, normalize, use_smear, smear_ref) = upload_ui()
    if bundle is None or not files:
        return
    if len(files) > MAX_UPLOAD_FILES:
        st.error(f"{len(files)} files uploaded; only the first {MAX_UPLOAD_FILES} are classified.")
        files = files[:MAX_UPLOAD_FILES]
    field_bundle, field_note = services.field_model(bundle, lambda: smear_bundle(smear_ref), use_smear)
    step = st.empty()  # what is being done, counting photos and cells (a rerun shows the kept result at once)
    with st.spinner(f"Reading {len(files)} upload{'' if len(files) == 1 else 's'}: a cell on black is classified, "
                    "a smear photo segmented and each of its white cells classified…"):
        result = widgets.classify_once(bundle, files, settings.runs_dir, actor, progress=step.caption, gradcam=gradcam,
                                       as_fields=as_fields, normalize_stain=normalize, field_bundle=field_bundle)
    step.empty()
    if result is None:
        return
    rule = bundle.rule
    st.caption(f"Model: {bundle.description}. Decision rule: threshold {rule.threshold:.2f} on calibrated "
               f"P(blast) (temperature {rule.temperature:.2f}, fitted on {rule.fitted_on}); cells within "
               f"{rule.band:.2f} of it are flagged for manual review. "
               + ("Images unlike the training cells are not assessed (out-of-distribution gate)."
                  if bundle.gate is not None else "This model has no out-of-distribution gate: it judges every "
                  "image, even ones unlike its training cells."))
    if len(result.table):
        results_ui(result, gradcam, rule.threshold, settings.runs_dir, actor)
    if result.fields or not result.field_readout.empty:
        fields_ui(result.fields, gradcam, result.overlays, result.field_readout, field_note)
        verify_ui(result, settings.runs_dir, actor)
    audit_ui(settings, actor)


main()
