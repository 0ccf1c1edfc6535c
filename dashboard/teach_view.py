"""Train page section: teach the smear model the cells a lab verified on the Classify page (drawing only; the work
goes through `services`)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import services
from dashboard.auth import Actor

TITLE = "Teach the smear model from verified cells"
FIGURES = {"photos": "fields", "judged_share": "judged share", "blasts_photos_called_blasts": "blasts fields called blasts",
           "no_blasts_photos_called_blasts": "no-blasts fields called blasts", "sensitivity": "sensitivity",
           "specificity": "specificity", "balanced_accuracy": "balanced accuracy", "cells": "cells",
           "cells_judged_share": "cells judged share"}


def adaptation_table(adaptation: dict) -> pd.DataFrame:
    """The lab's cross-validation by photo before (the base as it is) and after the refit, one row each, the
    figures named in words (a card's `adaptation`)."""
    rows = []
    for when, words in (("before", "before (the base as it is)"), ("after", "after (refitted)")):
        for lab, f in adaptation.get(when, {}).items():
            rows.append({"": words, "lab": lab, **{name: f.get(key) for key, name in FIGURES.items()}})
    return pd.DataFrame(rows)


def teach_ui(settings, actor: Actor) -> None:
    """In an expander "Teach the smear model from verified cells": the verified cells per sample, a lab name, and
    (for a trainer) the refit: a new smear model folder that Classify then offers, with the lab's cross-validation
    before and after."""
    with st.expander(TITLE):
        _teach(settings, actor)


def _teach(settings, actor: Actor) -> None:
    st.caption("Each white cell verified on the Classify page (blast or normal) teaches the smear model: a refit "
               "keeps the base's backbone and its training cells and adds this lab's verified cells, then writes a "
               "new model version (the base is never changed). 'Not a white cell' and 'unsure' cells are left out.")
    summary = services.verified_summary(settings.runs_dir)
    if summary.empty:
        st.info("No cell has been verified yet: verify the white cells of smear uploads on the Classify page first.")
        return
    st.dataframe(summary, hide_index=True, width="stretch")
    models = services.smear_models()
    if not models:
        st.info("No smear model is installed to refit (models/smear/).")
        return
    c1, c2 = st.columns(2)
    base = c1.selectbox("Base smear model", list(models), key="teach-base",
                        help="the model whose head, rules and gate are refitted; the shipped one unless a lab's own")
    lab = c2.text_input("Lab name", "mylab", key="teach-lab", max_chars=48,
                        help="names the new folder (<lab>-v1, -v2, ...) and this lab in the model card and gate")
    why = actor.refusal("launch")
    if why:
        st.info(f"{why} A trainer can refit the smear model from these cells.")
    elif st.button("Refit the smear model from verified cells", key="teach-refit", type="primary"):
        with st.spinner("Refitting the smear model on the verified cells (cross-validation by field)…"):
            try:
                folder, card = services.refit_smear_from_verified(settings.runs_dir, lab, models[base], actor=actor)
            except (ValueError, FileNotFoundError, services.PermissionDenied) as exc:
                st.error(f"Not refitted: {exc}")
            else:
                st.session_state["teach-result"] = {"folder": folder.name, "name": card.get("name", folder.name),
                                                    "adaptation": card["adaptation"], "verified": card.get("verified")}
    result = st.session_state.get("teach-result")
    if result:
        st.success(f"New smear model **{result['name']}** written as `{result['folder']}` in the models folder: the "
                   "Classify page offers it for smear fields.")
        a = result["adaptation"]
        st.caption(f"{a['folds']}-fold cross-validation by field over the lab's {a['photos']} fields "
                   f"({a['cells']} cells): figures on fields the model had not seen.")
        st.dataframe(adaptation_table(a), hide_index=True, width="stretch")
