"""Data: what a dataset holds (the report's Table 1), subjects, class balance, indexer problems, samples."""
import streamlit as st

from dashboard import auth, charts, services
from dashboard.settings import Settings


@st.cache_data(show_spinner="Indexing…", max_entries=8)
def overview(path: str, stamp: float) -> dict:
    return services.dataset_overview(path)


def overrides_ui(settings: Settings, manifest) -> None:
    """Reviewers' label corrections that concern this dataset (matched by file name)."""
    overrides = services.label_overrides(settings.runs_dir)
    here = overrides[overrides["name"].isin(set(manifest["name"]))]
    st.subheader("Label overrides")
    if here.empty:
        st.caption("No reviewer has marked a label of this dataset as wrong (Misclassified page → Review label).")
        return
    st.caption(f"{len(here)} cells of this dataset have a corrected label (their latest review says the label is "
               "wrong); runs use them only when asked to (Train page option, `--label-overrides`).")
    st.dataframe(here, hide_index=True)


def main() -> None:
    auth.current_actor()  # signed in (or local mode), else the sign-in page and a stop
    settings = Settings.from_env()
    st.title("Data")
    datasets = settings.datasets()
    name = st.selectbox("Dataset", list(datasets))
    path = datasets[name]
    if not path.exists():
        st.warning(f"{path} does not exist yet (the demo set is made by `make run` or `make demo-data`).")
        return
    info = overview(str(path), path.stat().st_mtime)
    s = info["summary"]
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Cells", s["cells"])
    c2.metric("Subjects (all / hem)", f"{s['subjects'].get('all', 0)} / {s['subjects'].get('hem', 0)}")
    c3.metric("Blast : normal", f"{info['imbalance']:.2f} : 1")
    c4.metric("Excluded files", s["excluded"])
    st.caption(f"{path} · layout {s['layout']}")
    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Cells per class and source")
        st.dataframe(info["by_source"])
        st.plotly_chart(charts.class_counts(info["by_source"], "Cells per source"))
    with c2:
        st.subheader("Cells per class and split")
        st.caption(info["split_note"])
        if not info["by_split"].empty:
            st.dataframe(info["by_split"])
            st.plotly_chart(charts.class_counts(info["by_split"], "Cells per split"))
    st.subheader("Problems found by the indexer")
    if info["problems"].empty:
        st.success("No problems: every file is usable.")
    else:
        for reason, n in s["excluded_by_reason"].items():
            st.write(f"- {n} × {reason}")
        st.dataframe(info["problems"], hide_index=True)
    overrides_ui(settings, info["manifest"])
    for label in ("all", "hem"):
        samples = services.sample_crops(info["manifest"], label)
        if samples:
            st.subheader(f"Sample {label} cells")
            st.image([img for _, img in samples], caption=[n for n, _ in samples], width=140)


main()
