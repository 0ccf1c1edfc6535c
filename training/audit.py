"""The audit trail of classifications: who classified what file, with which model and rule, and what came out.

Every classification made in the dashboard or with `python -m training predict` appends one record per file
to the run store (`classifications` table). Only the record is kept: the file's name and SHA-256, never its
pixels.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pandas as pd

from training.store import RunStore


def sha256_of(source) -> str:
    """SHA-256 of bytes or of a file's content (read in 1 MB blocks)."""
    h = hashlib.sha256()
    if isinstance(source, (bytes, bytearray, memoryview)):
        h.update(source)
    else:
        with open(source, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def files_sha256(paths) -> str:
    """One digest naming a model made of several files (an ensemble's members): the SHA-256 of one file alone,
    else of the lines "<file name> <its SHA-256>" in the order given, so changing any member changes it."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return sha256_of(paths[0])
    return sha256_of("".join(f"{p.name} {sha256_of(p)}\n" for p in paths).encode())


def model_sha256(path) -> str:
    """The digest an audit record names a model by: of its file, or for an ensemble folder's `model.keras`, of
    every member file (`files_sha256`), so a record identifies the whole ensemble that made the call."""
    from core.decide.model_folder import MODEL_FILE, model_files

    path = Path(path)
    if path.name == MODEL_FILE:
        return files_sha256(model_files(path.parent))
    return sha256_of(path)


def rule_text(rule) -> str:
    if rule is None:
        return "threshold 0.50 (no decision rule)"
    return (f"threshold {rule.threshold:.3f} on calibrated P(blast), temperature {rule.temperature:.3f}, "
            f"review band {rule.band:.2f}, fitted on {rule.fitted_on}")


def record(store: RunStore, table: pd.DataFrame, sources: dict[str, object], model: str, model_sha256: str | None,
           rule, source: str, action: str | dict[str, str] | None = None,
           file_names: dict[str, str] | None = None) -> int:
    """Append the rows of a classification table (`classify` output; name or path column) to the audit trail.

    `sources` maps each row's name to its path or bytes (hashed here). `action` names the classification action
    (one for all rows, or one per row's name: e.g. a dashboard upload's file id): every record then gets a uid
    from it, the model, the rule and the file, so showing the same calls again (a page rerun) stores nothing new,
    while a new upload or another model is recorded. `file_names` maps a row's name to the file name recorded
    (the dashboard's rows are keyed by upload position: `cell.bmp (2)` is recorded as the user's `cell.bmp`).
    Returns the number of records.
    """
    name_col = "name" if "name" in table else "path" if "path" in table else "file"
    prob_col = next(c for c in ("prob_all_calibrated", "calibrated_prob_blast") if c in table)
    review_col = next(c for c in ("uncertain", "review_manually") if c in table)
    now, text = time.time(), rule_text(rule)
    records = []
    for row in table.to_dict("records"):
        name = row[name_col]
        src = sources.get(name)
        try:
            digest = sha256_of(src) if src is not None else None
        except OSError as exc:
            digest = f"unreadable: {exc}"
        ood = row.get("out_of_distribution")
        records.append({
            "at": now, "source": source, "model": model, "model_sha256": model_sha256,
            "file_name": (file_names or {}).get(name) or (Path(str(name)).name if isinstance(src, (str, os.PathLike))
                                                          else str(name)),
            "file_sha256": digest, "prediction": row.get("prediction") if pd.notna(row.get("prediction")) else None,
            "prob_all_calibrated": None if pd.isna(row.get(prob_col)) else float(row[prob_col]),
            "review": None if row.get(review_col) is None or pd.isna(row.get(review_col)) else int(bool(row[review_col])),
            "out_of_distribution": None if ood is None or pd.isna(ood) else int(bool(ood)),
            "ood_reason": row.get("ood_reason") if isinstance(row.get("ood_reason"), str) else None,
            "error": row.get("error") if isinstance(row.get("error"), str) else None, "rule": text,
        })
        act = action.get(str(name)) if isinstance(action, dict) else action
        if act is not None:
            key = "\x1f".join(map(str, (act, source, model, model_sha256, text, name, digest)))
            records[-1]["uid"] = hashlib.sha256(key.encode()).hexdigest()
    store.log_classifications(records)
    return len(records)
