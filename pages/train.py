"""Train: pick a preset, see how long it will take here, adjust anything under Advanced, launch it in the
background, follow it live, cancel or resume."""
import dataclasses
import json

import streamlit as st

from dashboard import auth, charts, services, teach_view, widgets
from dashboard.services import RunConfig, RunStore
from dashboard.settings import Settings

SPLITS = {"patient": "patient — subject-disjoint (default, sound)", "official": "official — challenge folds, "
          "prelim set as test", "image": "image — random cells (the report's protocol; LEAKS SUBJECTS, optimistic)",
          "all": "all — every cell trains, fixed epochs, no validation (a final model measured by cross-validation)"}
HELP = services.config_help()


@st.cache_resource(show_spinner=False)
def gpu_here() -> bool:
    return services.has_gpu()


def preset_ui() -> str:
    """The preset picker, first: one line on each; without a GPU it proposes one that finishes in minutes."""
    presets = services.run_presets()
    names = list(presets)
    default = "starter" if gpu_here() else "quick_demo"
    name = st.selectbox("Preset", names, index=names.index(default), key="preset",
                        help="a whole run's settings in one choice; every setting stays adjustable under Advanced")
    st.caption(f"**{name}**: {presets[name]}")
    return name


# (field, label, upper bound, step) of the jitter sliders, each from 0 (off)
STAIN_SLIDERS = [("hed_sigma", "HED jitter", 0.3, 0.01), ("brightness", "Brightness", 0.5, 0.05),
                 ("contrast", "Contrast", 0.5, 0.05), ("saturation", "Saturation", 0.5, 0.05),
                 ("hue", "Hue", 0.2, 0.01)]
TEXTURE_SLIDERS = [("sharpness", "Sharpness jitter", 2.0, 0.1), ("noise_std", "Noise (grey levels)", 20.0, 1.0),
                   ("mixstyle", "MixStyle probability", 1.0, 0.1), ("subject_correction", "Subject correction", 1.0, 0.1)]


def _sliders(cols, base: RunConfig, specs, k) -> dict:
    return {f: float(c.slider(label, 0.0, hi, float(getattr(base, f)), step, key=k(f), help=HELP[f]))
            for c, (f, label, hi, step) in zip(cols, specs)}


def advanced_ui(base: RunConfig, key: str, weights: dict | None) -> dict:
    """Every other knob, its current (preset) value visible; widgets keyed by preset so a new preset resets them.
    Start weights come from `weights` (files under the weights roots; None: not offered), never a typed path."""
    k = lambda f: f"{key}-{f}"  # noqa: E731
    v = {}
    c1, c2, c3, c4 = st.columns(4)
    archs = services.model_names()
    v["architecture"] = c1.selectbox("Architecture", archs, archs.index(base.architecture), key=k("arch"),
                                     help=HELP["architecture"])
    inits = ["none", "imagenet"] + (["weights file"] if weights is not None else [])
    init = base.init if base.init in inits else "none"
    chosen = c2.selectbox("Start from (init)", inits, inits.index(init), key=k("init"), help=HELP["init"])
    v["init"] = widgets.weights_ui(c2, weights or {}, k("init_file")) if chosen == "weights file" else chosen
    v["freeze_backbone"] = c3.checkbox("Freeze backbone", base.freeze_backbone, key=k("freeze"),
                                       help=HELP["freeze_backbone"])
    v["split"] = c4.selectbox("Split", list(SPLITS), list(SPLITS).index(base.split), format_func=SPLITS.get,
                              key=k("split"), help=HELP["split"])
    c1, c2, c3, c4 = st.columns(4)
    v["image_size"] = int(c1.number_input("Input size (px)", 32, 250, base.image_size, 2, key=k("size"),
                                          help=HELP["image_size"]))
    v["epochs"] = int(c2.number_input("Epochs", 1, 500, base.epochs, key=k("epochs"), help=HELP["epochs"]))
    v["batch_size"] = int(c3.number_input("Batch", 1, 1024, base.batch_size, key=k("batch"), help=HELP["batch_size"]))
    v["learning_rate"] = float(c4.number_input("Learning rate", 1e-6, 1.0, base.learning_rate, format="%.0e",
                                               key=k("lr"), help=HELP["learning_rate"]))
    c1, c2, c3, c4 = st.columns(4)
    v["samples_per_class"] = int(c1.number_input("Cells per class per epoch", 16, 100_000, base.samples_per_class,
                                                 key=k("per_class"), help=HELP["samples_per_class"]))
    v["early_stopping"] = c2.checkbox("Early stopping", base.early_stopping, key=k("early"),
                                      help=HELP["early_stopping"])
    v["val_augmented"] = c3.checkbox("Augmented validation (optimistic)", base.val_augmented, key=k("val_aug"),
                                     help=HELP["val_augmented"])
    l1l2 = c4.number_input("Head L1/L2 (empty = architecture's)", 0.0, 1.0, base.head_l1l2, format="%.0e",
                           key=k("l1l2"), help=HELP["head_l1l2"])
    v["head_l1l2"] = None if l1l2 is None else float(l1l2)
    st.markdown("**Augmentation** (report §5.2)")
    c1, c2, c3, c4 = st.columns(4)
    v["augment"] = c1.checkbox("Augment", base.augment, key=k("augment"), help=HELP["augment"])
    rot = c2.slider("Rotation range (°)", 0, 360, (int(base.rotation_min_deg), int(base.rotation_max_deg)),
                    key=k("rot"))
    v["rotation_min_deg"], v["rotation_max_deg"] = float(rot[0]), float(rot[1])
    v["shear"] = float(c3.slider("Shear", 0.0, 0.5, base.shear, key=k("shear"), help=HELP["shear"]))
    v["salt_pepper"] = float(c4.slider("Salt-and-pepper rate", 0.0, 0.1, base.salt_pepper, 0.005, key=k("sp"),
                                       help=HELP["salt_pepper"]))
    st.markdown("**Stain and colour** (generalising across patients; the report's presets: all off)")
    cols = st.columns(6)
    v["cell_standardize"] = cols[0].checkbox("Standardise cells", base.cell_standardize, key=k("std"),
                                             help=HELP["cell_standardize"])
    v |= _sliders(cols[1:], base, STAIN_SLIDERS, k)
    v |= _sliders(st.columns(4), base, TEXTURE_SLIDERS, k)
    return v


@st.cache_data(show_spinner="Timing a few training batches on this machine…", max_entries=32)
def timed_estimate(cfg_json: str, runs_dir: str) -> str | None:
    return services.run_estimate(RunConfig.from_dict(json.loads(cfg_json)), runs_dir, time_now=True)


def estimate_ui(cfg: RunConfig, runs_dir: str) -> None:
    """A plain estimate before launch: from an earlier run's measured speed here, else batches timed now (at once
    for light models; on request for large ones, whose compile alone takes a minute)."""
    try:
        text = services.run_estimate(cfg, runs_dir)
        if text is None and (services.cheap_to_time(cfg) or st.button("Estimate the time (times a few batches)")):
            text = timed_estimate(cfg.to_json(), runs_dir)
    except ValueError as exc:  # a setting the architecture cannot take: said here already
        st.warning(f"No estimate: {exc}")
        return
    if text is None:
        st.info("No estimate yet: no earlier run of this shape on this machine.")
    else:
        st.info(text)


def config_ui(settings: Settings, actor: auth.Actor) -> RunConfig | None:
    datasets, can = settings.datasets(), actor.can("launch")  # a viewer picks no server folder or file
    name = preset_ui()
    data = st.selectbox("Data source", list(datasets), help="the demo set or a folder under the data roots") \
        if can else next(iter(datasets))
    base = services.preset_config(name)
    with st.expander("Advanced: every setting of this preset", expanded=False):
        run_name = st.text_input("Run name", help=HELP["name"])
        values = advanced_ui(base, name, settings.weights_files() if can else None)
        n_over = len(services.label_overrides(settings.runs_dir))
        use_over = st.checkbox(f"Train with the reviewers' label corrections ({n_over} cells)", False,
                               disabled=n_over == 0, help=HELP["label_overrides"])
    cfg = dataclasses.replace(base, name=run_name or name, data_dir=str(datasets[data]),
                              runs_dir=str(settings.runs_dir), cache_dir=str(settings.runs_dir / "cache"), **values)
    estimate_ui(cfg, str(settings.runs_dir))
    c1, c2, c3 = st.columns(3)
    preview = c1.button("Preview augmentation")
    show_split = c2.button("Preview split")
    launch = c3.button("Launch training", type="primary", disabled=not actor.can("launch"),
                       help=actor.refusal("launch"))
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
            cfg = dataclasses.replace(cfg, label_overrides=str(services.export_overrides(settings.runs_dir,
                                                                                         actor=actor)))
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


def _act(what, *args, **kwargs) -> bool:
    """A service call that may be refused: the refusal said on the page, never a traceback."""
    try:
        what(*args, **kwargs)
    except (services.PermissionDenied, services.StoreUnavailable) as exc:
        st.error(str(exc))
        return False
    return True


@st.fragment(run_every=2)
def live_ui(runs_dir: str, run_id: str, actor: auth.Actor) -> None:
    store = RunStore(runs_dir)
    info = services.progress_info(store, run_id)
    st.progress(info["fraction"], text=info["text"])
    epochs = store.epochs(run_id)
    if len(epochs):
        st.plotly_chart(charts.training_curves(epochs), key=f"curves-{run_id}")
    c1, c2, c3 = st.columns(3)
    if info["status"] in ("queued", "running") and c1.button("Cancel", key=f"cancel-{run_id}",
                                                             disabled=not actor.can("cancel")) \
            and _act(services.cancel_run, runs_dir, run_id, actor=actor):
        st.toast("Stop requested: the run writes a checkpoint after the current batch; Resume continues there.")
    if info["status"] in ("cancelled", "failed") and c2.button("Resume", key=f"resume-{run_id}",
                                                               disabled=not actor.can("resume")) \
            and _act(services.resume_run, runs_dir, run_id, actor=actor):
        st.toast("Resuming from the last checkpoint.")
    if info["status"] in ("completed", "cancelled", "failed") and actor.can("resume"):
        planned = int(store.get_run(run_id)["epochs_planned"] or 1)
        more = c3.number_input("Extend to epochs", planned + 1, 1000, planned + 1, key=f"epochs-{run_id}")
        if c3.button("Extend", key=f"extend-{run_id}") and _act(services.resume_run, runs_dir, run_id,
                                                                epochs=int(more), actor=actor):
            st.toast(f"Continuing to {int(more)} epochs from the last checkpoint.")
    st.caption(f"TensorBoard: `tensorboard --logdir {runs_dir}/{run_id}/tensorboard`")
    if info["status"] == "failed" and info["error"]:
        st.error("The run failed:")
        st.code(info["error"][-3000:])


def main() -> None:
    settings = Settings.from_env()
    actor = auth.current_actor()  # signed in (or local mode), else the sign-in page and a stop
    st.title("Train")
    store = RunStore(settings.runs_dir)
    st.caption("Research use only: not a diagnostic device.")
    if not actor.can("launch"):
        st.info(f"{actor.refusal('launch')} You can follow the runs below.")
    st.subheader("New run")
    cfg = config_ui(settings, actor)
    if cfg is not None:
        try:
            run_id = services.launch_run(cfg, actor=actor)
        except (ValueError, services.PermissionDenied, services.StoreUnavailable) as e:  # a setting the architecture cannot take: said before anything starts
            st.error(f"Not launched: {e}")
        else:
            st.session_state["selected_run"] = run_id
            st.success(f"Run {run_id} launched in the background: it keeps going if you close this tab.")
    teach_view.teach_ui(settings, actor)  # in an expander: teach the smear model from verified cells
    st.subheader("Runs")
    run_id = jobs_ui(store)
    if run_id:
        live_ui(str(settings.runs_dir), run_id, actor)


main()
