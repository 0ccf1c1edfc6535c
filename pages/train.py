"""Train: configure a run (report defaults), launch it in the background, follow it live, cancel or resume."""
import dataclasses

import streamlit as st

from dashboard import charts, services
from dashboard.services import RunConfig, RunStore
from dashboard.settings import Settings

SPLITS = {"patient": "patient — subject-disjoint (default, sound)", "official": "official — challenge folds, "
          "prelim set as test", "image": "image — random cells (the report's protocol; LEAKS SUBJECTS, optimistic)",
          "all": "all — every cell trains, fixed epochs, no validation (a final model measured by cross-validation)"}
HELP = services.config_help()


def config_ui(settings: Settings) -> RunConfig | None:
    datasets = settings.datasets()
    base = RunConfig()
    with st.form("new_run"):
        name = st.text_input("Run name", help=HELP["name"])
        data = st.selectbox("Data source", list(datasets), help="the demo set or a folder under the data roots")
        arch = st.selectbox("Architecture", services.model_names(), help=HELP["architecture"])
        split = st.radio("Split", list(SPLITS), format_func=SPLITS.get, help=HELP["split"])
        c1, c2, c3, c4 = st.columns(4)
        size = c1.number_input("Input size (px)", 32, 250, base.image_size, 2, help=HELP["image_size"])
        epochs = c2.number_input("Epochs (0 = architecture default)", 0, 500, 0, help=HELP["epochs"])
        batch = c3.number_input("Batch (0 = architecture default)", 0, 1024, 0, help=HELP["batch_size"])
        lr = c4.number_input("Learning rate", 1e-6, 1.0, base.learning_rate, format="%.0e", help=HELP["learning_rate"])
        c1, c2, c3, c4 = st.columns(4)
        per_class = c1.number_input("Cells per class per epoch", 16, 100_000, base.samples_per_class,
                                    help=HELP["samples_per_class"])
        early = c2.checkbox("Early stopping", base.early_stopping, help=HELP["early_stopping"])
        val_aug = c3.checkbox("Augmented validation (optimistic)", base.val_augmented, help=HELP["val_augmented"])
        l1l2 = c4.number_input("Head L1/L2 (empty = architecture's)", 0.0, 1.0, base.head_l1l2, format="%.0e",
                               help=HELP["head_l1l2"])
        st.markdown("**Augmentation** (report §5.2)")
        c1, c2, c3, c4 = st.columns(4)
        augment = c1.checkbox("Augment", base.augment, help=HELP["augment"])
        rot = c2.slider("Rotation range (°)", 0, 360, (int(base.rotation_min_deg), int(base.rotation_max_deg)))
        shear = c3.slider("Shear", 0.0, 0.5, base.shear, help=HELP["shear"])
        noise = c4.slider("Salt-and-pepper rate", 0.0, 0.1, base.salt_pepper, 0.005, help=HELP["salt_pepper"])
        st.markdown("**Stain and colour** (generalising across patients; `report` preset: all off)")
        c1, c2, c3, c4, c5, c6 = st.columns(6)
        std = c1.checkbox("Standardise cells", base.cell_standardize, help=HELP["cell_standardize"])
        hed = c2.slider("HED jitter", 0.0, 0.3, base.hed_sigma, 0.01, help=HELP["hed_sigma"])
        bright = c3.slider("Brightness", 0.0, 0.5, base.brightness, 0.05, help=HELP["brightness"])
        contrast = c4.slider("Contrast", 0.0, 0.5, base.contrast, 0.05, help=HELP["contrast"])
        sat = c5.slider("Saturation", 0.0, 0.5, base.saturation, 0.05, help=HELP["saturation"])
        hue = c6.slider("Hue", 0.0, 0.2, base.hue, 0.01, help=HELP["hue"])
        c1, c2, c3, c4 = st.columns(4)
        sharp = c1.slider("Sharpness jitter", 0.0, 2.0, base.sharpness, 0.1, help=HELP["sharpness"])
        noise_std = c2.slider("Noise (grey levels)", 0.0, 20.0, base.noise_std, 1.0, help=HELP["noise_std"])
        mixstyle = c3.slider("MixStyle probability", 0.0, 1.0, base.mixstyle, 0.1, help=HELP["mixstyle"])
        subj = c4.slider("Subject correction", 0.0, 1.0, base.subject_correction, 0.1,
                         help=HELP["subject_correction"])
        n_over = len(services.label_overrides(settings.runs_dir))
        use_over = st.checkbox(f"Train with the reviewers' label corrections ({n_over} cells)", False,
                               disabled=n_over == 0, help=HELP["label_overrides"])
        preview = st.form_submit_button("Preview augmentation")
        show_split = st.form_submit_button("Preview split")
        launch = st.form_submit_button("Launch training", type="primary")
    info = services.architecture_defaults(arch)
    cfg = dataclasses.replace(base, name=name, architecture=arch, data_dir=str(datasets[data]), split=split,
                              image_size=int(size), epochs=int(epochs) or info.epochs,
                              batch_size=int(batch) or info.batch_size, learning_rate=float(lr),
                              samples_per_class=int(per_class), early_stopping=early, val_augmented=val_aug,
                              head_l1l2=None if l1l2 is None else float(l1l2),
                              augment=augment, rotation_min_deg=float(rot[0]), rotation_max_deg=float(rot[1]),
                              shear=float(shear), salt_pepper=float(noise), cell_standardize=std,
                              hed_sigma=float(hed), brightness=float(bright), contrast=float(contrast),
                              saturation=float(sat), hue=float(hue), sharpness=float(sharp),
                              noise_std=float(noise_std), mixstyle=float(mixstyle),
                              subject_correction=float(subj), runs_dir=str(settings.runs_dir),
                              cache_dir=str(settings.runs_dir / "cache"))
    if preview:
        with st.spinner("Augmenting sample cells…"):
            st.image(services.augmentation_preview(cfg.data_dir, cfg), width=120)
    if show_split:
        split_preview_ui(cfg)
    if launch:
        if not settings.is_allowed(datasets[data]):
            st.error("That folder is not under the configured data roots.")
            return None
        split_preview_ui(cfg)  # what the run will train, validate and test on, said before it starts
        if use_over:  # a frozen copy: later reviews do not change what this run trained on
            cfg = dataclasses.replace(cfg, label_overrides=str(services.export_overrides(settings.runs_dir)))
        return cfg
    return None


@st.cache_data(show_spinner="Splitting the data…", max_entries=16, ttl=600)
def split_preview(data_dir: str, strategy: str, seed: int, val_fold: int) -> dict:
    return services.split_preview(data_dir, strategy, seed, val_fold)


def split_preview_ui(cfg: RunConfig) -> None:
    """Subjects and cells per class in each split, and plainly what a split lacking a class costs (warned, not
    refused)."""
    info = split_preview(cfg.data_dir, cfg.split, cfg.seed, cfg.val_fold)
    if info["error"]:
        st.warning(f"The {cfg.split} split cannot be made from this data: {info['error']}")
        return
    st.markdown(f"**Split** `{cfg.split}` (seed {cfg.seed}): subjects and cells per class"
                + (f" — {info['note']}" if info.get("note") else ""))
    st.dataframe(info["table"], hide_index=True)
    for w in info["warnings"]:
        st.warning(f"Split: {w}.")


def jobs_ui(store: RunStore) -> str | None:
    runs = store.list_runs()
    if runs.empty:
        st.info("No runs yet.")
        return None
    st.dataframe(runs[["id", "name", "architecture", "status", "device", "epochs_planned"]], hide_index=True)
    ids = runs["id"].tolist()
    current = st.session_state.get("selected_run")
    return st.selectbox("Follow run", ids, index=ids.index(current) if current in ids else 0)


@st.fragment(run_every=2)
def live_ui(runs_dir: str, run_id: str) -> None:
    store = RunStore(runs_dir)
    info = services.progress_info(store, run_id)
    st.progress(info["fraction"], text=info["text"])
    epochs = store.epochs(run_id)
    if len(epochs):
        st.plotly_chart(charts.training_curves(epochs), key=f"curves-{run_id}")
    c1, c2, c3 = st.columns(3)
    if info["status"] in ("queued", "running") and c1.button("Cancel", key=f"cancel-{run_id}"):
        services.cancel_run(runs_dir, run_id)
        st.toast("Stop requested: the run writes a checkpoint after the current batch; Resume continues there.")
    if info["status"] in ("cancelled", "failed") and c2.button("Resume", key=f"resume-{run_id}"):
        services.resume_run(runs_dir, run_id)
        st.toast("Resuming from the last checkpoint.")
    if info["status"] in ("completed", "cancelled", "failed"):
        planned = int(store.get_run(run_id)["epochs_planned"] or 1)
        more = c3.number_input("Extend to epochs", planned + 1, 1000, planned + 1, key=f"epochs-{run_id}")
        if c3.button("Extend", key=f"extend-{run_id}"):
            services.resume_run(runs_dir, run_id, epochs=int(more))
            st.toast(f"Continuing to {int(more)} epochs from the last checkpoint.")
    st.caption(f"TensorBoard: `tensorboard --logdir {runs_dir}/{run_id}/tensorboard`")
    if info["status"] == "failed" and info["error"]:
        st.error("The run failed:")
        st.code(info["error"][-3000:])


def main() -> None:
    settings = Settings.from_env()
    st.title("Train")
    store = RunStore(settings.runs_dir)
    with st.expander("New run", expanded=True):
        cfg = config_ui(settings)
    if cfg is not None:
        try:
            run_id = services.launch_run(cfg)
        except ValueError as e:  # a setting the architecture cannot take: said before anything starts
            st.error(f"Not launched: {e}")
        else:
            st.session_state["selected_run"] = run_id
            st.success(f"Run {run_id} launched in the background: it keeps going if you close this tab.")
    st.subheader("Runs")
    run_id = jobs_ui(store)
    if run_id:
        live_ui(str(settings.runs_dir), run_id)


main()
