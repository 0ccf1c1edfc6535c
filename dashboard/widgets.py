"""Small Streamlit widgets shared by several pages (drawing only; the work goes through `services`)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import services, uploads
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
            except (PermissionDenied, services.StoreUnavailable) as exc:
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


def classify_once(bundle, files: list, runs_dir: Path, actor: Actor, progress=None, **options):
    """Classify's uploads classified once: a rerun with the same uploads (file ids), model and options shows
    this session's last result again; one classification per session at a time; a store that is busy or under
    maintenance is said on the page (no result without its audit record). None when nothing is shown."""
    keys = [f.file_id for f in files]
    named = [(f.name, f.getvalue()) for f in files]
    key = uploads.result_key(uploads.labelled(named, keys), bundle.description, bundle.model_sha256,
                             str(runs_dir), sorted((k, getattr(v, "description", v)) for k, v in options.items()))
    hit = uploads.cached(st.session_state, key)
    if hit is not None:
        return hit
    try:
        with uploads.one_job(st.session_state):
            result = services.classify_uploads(bundle, named, runs_dir=runs_dir, actor=actor, upload_keys=keys,
                                               progress=progress, **options)
    except (uploads.JobRunning, services.StoreUnavailable) as exc:
        st.error(str(exc))
        return None
    uploads.keep(st.session_state, key, result)
    return result


def weights_ui(where, weights: dict, key: str) -> str:
    """The start weights, chosen among the files under the weights roots (never a typed server path); "" when
    there are none (a launch is then refused, saying where to put them)."""
    if not weights:
        where.caption("No .weights.h5 file under the weights roots (CNMC_WEIGHTS_ROOTS).")
        return ""
    label = where.selectbox("Weights file", list(weights), key=key,
                            help="a .weights.h5 saved from the same architecture and size, under the weights roots")
    return str(weights[label])
