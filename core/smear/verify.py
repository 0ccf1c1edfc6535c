"""A person's verification of a smear upload's cells, as digital-morphology systems have a technologist verify
each pre-classified cell before a count is signed off.

Each white cell found gets at most one current decision (`DECISIONS`); the verified read-out is the same
`field_readout` (same call rule) run on the cells as verified: a confirmed cell keeps its pre-classified class, a
cell re-classed takes the verifier's class (calibrated P(blast) 1 or 0, so a probability bar in the rule counts
it), a "not a white cell" leaves the count, an "unsure" cell is not judged. Cells nobody verified keep their
pre-classification, and the read-out says how many were verified."""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import pandas as pd

from core.decide.calibration import CallRule

CONFIRM, BLAST, NORMAL, NOT_WBC, UNSURE = "confirm", "blast", "normal", "not a white cell", "unsure"
DECISIONS = (CONFIRM, BLAST, NORMAL, NOT_WBC, UNSURE)  # in the order the verification view offers them
SHORTCUTS = {CONFIRM: "y", BLAST: "b", NORMAL: "n", NOT_WBC: "x", UNSURE: "u"}  # one key each (Streamlit keeps c, r)
UNSURE_REASON = "unsure: the verifier could not tell"


def sample_key(digests: Iterable[str]) -> str:
    """What makes two uploads the same sample: their files' SHA-256s, whatever their order or names (re-opening
    the same photos restores their verification)."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:32]


def current_decisions(history: pd.DataFrame) -> pd.DataFrame:
    """The current decision per (sample, cell_name) among a run store's verification rows: the latest recorded
    (by store id). Two people may verify one cell; every row is kept, and the last word is the cell's."""
    return history.sort_values("id").drop_duplicates(["sample", "cell_name"], keep="last").reset_index(drop=True)


def verified_class(row: Mapping, decision: str | None) -> str | None:
    """"blast", "normal", None (not judged) or NOT_WBC for one cell: its pre-classification under `decision`."""
    pre = {"all": BLAST, "hem": NORMAL}.get(row.get("prediction"))  # None: not judged (gate, unreadable)
    if decision is None or decision == CONFIRM:
        return pre
    if decision in (BLAST, NORMAL, NOT_WBC):
        return decision
    if decision == UNSURE:
        return None
    raise ValueError(f"unknown verification decision {decision!r}; one of {', '.join(DECISIONS)}")


def apply_verification(cells: pd.DataFrame, decisions: Mapping[str, str]) -> pd.DataFrame:
    """The cells as verified (keyed by `cell_name`): a `decision` column (None: not verified), re-classed cells
    with the verifier's prediction and a calibrated P(blast) of 1 or 0 and no review flag, unsure cells not
    judged, and "not a white cell" rows dropped. The columns are those `field_readout` reads."""
    t = cells.rename(columns={"calibrated_prob_blast": "prob_all_calibrated", "review_manually": "uncertain"})
    t = t.astype({c: object for c in ("prediction", "uncertain", "ood_reason") if c in t}).copy()
    t["prob_all_calibrated"] = pd.to_numeric(t.get("prob_all_calibrated", pd.Series(float("nan"), index=t.index)),
                                             errors="coerce").astype(float)
    said = [decisions.get(str(n)) for n in t["cell_name"]]
    cls = [verified_class(r, d) for r, d in zip(t.to_dict("records"), said)]
    t["decision"] = pd.Series(said, index=t.index, dtype=object)
    t["verified_class"] = pd.Series(cls, index=t.index, dtype=object)
    for i, (d, c) in enumerate(zip(said, cls)):
        if d is None:
            continue
        at = t.index[i]
        t.at[at, "prediction"] = {BLAST: "all", NORMAL: "hem"}.get(c)
        t.at[at, "prob_all_calibrated"] = {BLAST: 1.0, NORMAL: 0.0}.get(c, float("nan"))
        t.at[at, "uncertain"] = False
        if d == UNSURE:  # a confirmed "not judged" keeps the model's reason
            t.at[at, "ood_reason"] = UNSURE_REASON
    return t[[c != NOT_WBC for c in cls]].reset_index(drop=True)


def verified_readout(cells: pd.DataFrame, decisions: Mapping[str, str], fields: list[str],
                     rule: CallRule | None = None) -> pd.DataFrame:
    """`field_readout` of the cells as verified, one row per field and the pooled row, plus `verified` (cells
    with a decision, "not a white cell" included) and `removed` (cells a verifier said were not white cells)."""
    from core.smear.fields import field_readout

    t = apply_verification(cells, decisions)
    out = field_readout(t, fields, rule=rule)
    said = [decisions.get(str(n)) for n in cells["cell_name"]]
    per: dict[str, list[int]] = {}
    for f, d in zip(cells["field"].astype(str), said):
        n = per.setdefault(f, [0, 0])
        n[0] += d is not None
        n[1] += d == NOT_WBC
    out["verified"] = [per.get(f, [0, 0])[0] for f in out["field"]]
    out["removed"] = [per.get(f, [0, 0])[1] for f in out["field"]]
    out.loc[out.index[-1], ["verified", "removed"]] = [sum(d is not None for d in said),
                                                       sum(d == NOT_WBC for d in said)]
    out.attrs["rule"] = (rule or CallRule()).describe()
    return out
