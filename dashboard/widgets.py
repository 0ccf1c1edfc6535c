"""Small Streamlit widgets shared by several pages (drawing only; the work goes through `services`)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import services
from dashboard.auth import Actor, PermissionDenied


def reviewer_ui(actor: Actor) -> None:
    """Local mode: the reviewer's name, typed (a label, not a sign-in). Signed in: the identity is the name, and
    the sidebar already shows it."""
    if not actor.signed_in:
        st.sidebar.text_input("Reviewer", key="reviewer", help="your name, stored with each label review "
                              "(local single-user mode: typed, not checked)")


def review_label_ui(runs_dir: Path, name: str, label: str, key: str, run_id: str | None = None,
                    path: str | None = None, actor: Actor | None = None) -> None:
    """A reviewer's decision on a cell's dataset label, stored with the reviewer's identity and the time in the
    run store; a role that may not relabel is told so instead."""
    with st.popover("Review label"):
        refused = actor.refusal("review") if actor is not None else "Relabelling needs a signed-in reviewer."
        if refused:
            st.warning(refused)
            return
        decision = st.radio(f"Dataset label `{label}` is…", services.REVIEW_DECISIONS, key=f"decision-{key}")
        note = st.text_input("Note", key=f"note-{key}")
        if st.button("Save review", key=f"save-{key}"):
            who = actor.named(st.session_state.get("reviewer", ""))
            if not who.identity.strip():
                st.error("Enter your name as reviewer (sidebar) first.")
                return
            try:
                services.record_review(runs_dir, name, label, decision, note, run_id, path, actor=who)
            except PermissionDenied as exc:
                st.error(str(exc))
            else:
                st.toast(f"Saved: {name}: {decision} (reviewer {who.identity})")


def cell_cards_ui(read, crops: dict, overlays: dict, runs_dir: Path, max_cards: int = 48,
                  actor: Actor | None = None) -> None:
    """Classify's cards: each cell (its Grad-CAM overlay where given) with its call; a named C-NMC training
    cell also gets the label-review button."""
    cols = st.columns(4)
    for i, row in enumerate(read.head(max_cards).itertuples()):
        with cols[i % 4]:
            if row.out_of_distribution:
                caption = f"{row.file}: Not assessed ({row.ood_reason})"
            else:
                flag = " · review manually" if row.review_manually else ""
                caption = f"{row.file}: {row.prediction} (P(blast) {row.calibrated_prob_blast:.2f}){flag}"
            st.image(overlays.get(row.file, crops[row.file]), caption=caption, width="stretch")
            label = services.label_in_name(row.file)
            if label:  # a named C-NMC training cell: its dataset label can be reviewed
                review_label_ui(runs_dir, row.file, label, f"classify-{i}", actor=actor)
    if len(read) > max_cards:
        st.caption(f"Cards shown for the first {max_cards} images; the table and CSV hold all {len(read)}.")
