"""Small Streamlit widgets shared by several pages (drawing only; the work goes through `services`)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import services


def reviewer_ui() -> None:
    st.sidebar.text_input("Reviewer", key="reviewer", help="your name, stored with each label review")


def review_label_ui(runs_dir: Path, name: str, label: str, key: str, run_id: str | None = None,
                    path: str | None = None) -> None:
    """A reviewer's decision on a cell's dataset label, stored with name and time in the run store."""
    with st.popover("Review label"):
        decision = st.radio(f"Dataset label `{label}` is…", services.REVIEW_DECISIONS, key=f"decision-{key}")
        note = st.text_input("Note", key=f"note-{key}")
        if st.button("Save review", key=f"save-{key}"):
            reviewer = st.session_state.get("reviewer", "")
            if not reviewer.strip():
                st.error("Enter your name as reviewer (sidebar) first.")
            else:
                services.record_review(runs_dir, name, label, decision, reviewer, note, run_id, path)
                st.toast(f"Saved: {name}: {decision}")
