"""Evaluate runs (or an ensemble of runs) on a split, and resolve models for prediction.

Writes into the run folder (an ensemble gets `runs/ensembles/<ids>/`): metrics.json (with provenance: which
runs, data, split and subjects), report.csv (the report's table), subjects.csv, errors.csv (false positives and
negatives, most confident first), predictions_<split>.csv, calibration.json and PNG figures.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from core.data.labels import CLASSES
from core.decide import calibration as cal
from core.decide.metrics import error_tables, evaluate_predictions, report_table, subject_readout
from training.config import RunConfig
from training.store import RunStore

log = logging.getLogger("cnmc.evaluate")


def run_model_path(store: RunStore, run_id: str) -> Path:
    path = store.run_dir(run_id) / "best.keras"
    if not path.exists():
        raise FileNotFoundError(f"run {run_id} has no best.keras (status {store.get_run(run_id)['status']})")
    return path


def resolve_model(ref: str, store: RunStore):
    """(models, decision rule, input size, description, gate, model file) for `starter` / `smear`, a model
    folder, a run id or a `.keras` file (all loaded in safe mode). `models` is a list: one model, or an ensemble
    folder's members (P(all) is their mean). A bare `.keras` file has no gate: it judges every image."""
    from core.decide.gate import Gate
    from core.decide.model_folder import is_model_folder, load_model_folder
    from core.nets.models import load_model

    if is_model_folder(ref):
        mf = load_model_folder(ref)
        name = mf.card.get("name") or str(mf.folder)
        what = f"model {name} ({mf.folder})" + (f", an ensemble of {len(mf.models)}" if len(mf.models) > 1 else "")
        return mf.models, mf.rule, mf.size, what, mf.gate, str(mf.folder / "model.keras")
    gate = None
    if ref.endswith(".keras") and Path(ref).is_file():
        model, rule, what, path = load_model(ref), cal.DecisionRule(), f"model file {ref}", ref
    else:
        path = str(run_model_path(store, ref))
        model = load_model(path)
        calib = store.run_dir(ref) / "calibration.json"
        rule = cal.DecisionRule.load(calib) if calib.exists() else cal.DecisionRule()
        gate_file = store.run_dir(ref) / "gate.json"
        gate = Gate.load(gate_file) if gate_file.exists() else None
        what = f"run {ref}"
    return [model], rule, int(model.inputs[0].shape[1]), what, gate, path


def _split_rows(store: RunStore, run_id: str, data_root: str | None = None) -> tuple[RunConfig, pd.DataFrame]:
    """The run's config and split, with paths under `data_root` when the dataset was moved there."""
    from core.data.splits import load_split

    cfg = RunConfig.from_dict(store.get_run(run_id)["config"])
    return cfg, load_split(store.run_dir(run_id) / "split.csv", data_root=data_root)


def _require_files(paths: pd.Series, what: str) -> None:
    """A clear error, not a traceback from deep inside, when cells have to be read and are gone."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} cells of {what} are missing (first: {missing[0]}); "
                                "if the dataset was moved, give its new folder with --data-root")


def crop_margin_of(ref: str, store: RunStore) -> int:
    """The crop margin a model was trained with (its run's config, or its model folder's card); the report's
    100 px for anything that does not say."""
    from core.decide.model_folder import card_crop_margin, is_model_folder, read_card
    from core.image.preprocessing import CROP_MARGIN

    if is_model_folder(ref):  # the card alone: no weights loaded a second time
        return card_crop_margin(read_card(ref))
    if ref.endswith(".keras"):
        return CROP_MARGIN
    try:
        return int(store.get_run(ref)["config"].get("crop_margin", CROP_MARGIN))
    except KeyError:
        return CROP_MARGIN


def _cached_crops(table: pd.DataFrame, size: int, cache_dir: str, margin: int | None = None):
    """The crop cache of `table`'s cells (one stat per file); for a run's split.csv this is the key the
    trainer built, so its cache is reused rather than rebuilt."""
    from core.image.preprocessing import CropCache

    stats = [Path(p).stat() for p in table["path"]]
    files = pd.DataFrame({"path": table["path"].to_numpy(), "size": [st.st_size for st in stats],
                          "mtime_ns": [st.st_mtime_ns for st in stats]})
    from core.image.preprocessing import CROP_MARGIN

    return CropCache.build(files, cache_dir, size=size, margin=CROP_MARGIN if margin is None else margin,
                           progress=False)


def _predict(models, cache, paths: pd.Series, tta: bool) -> np.ndarray:
    from core.decide.inference import predict_proba

    return predict_proba(models, np.asarray(cache.array[cache.rows(paths)]), tta=tta)


def collect_predictions(store: RunStore, run_ids: Sequence[str], split: str = "test",
                        data_dir: str | None = None, tta: bool = False,
                        data_root: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(validation predictions, evaluation predictions, provenance), averaged over `run_ids`; `data_root` is
    where the runs' dataset is now, if it was moved after training."""
    from core.nets.models import load_model
    from core.data.splits import relocate

    first_cfg, first_split = _split_rows(store, run_ids[0], data_root)
    for rid in run_ids[1:]:
        _, other = _split_rows(store, rid, data_root)
        if not other[["path", "split"]].equals(first_split[["path", "split"]]):
            raise ValueError(f"run {rid} used a different split than {run_ids[0]}: an ensemble must share one")
    cols = ["path", "subject", "label", "split"]
    val = first_split[first_split["split"] == "val"][cols].reset_index(drop=True)
    if data_dir:
        from core.data.dataset import index

        manifest, _ = index(data_dir)
        target = manifest[manifest["label"].notna()][["path", "subject", "label"]].assign(split="external")
        target = target.reset_index(drop=True)
    else:
        if split not in ("train", "val", "test"):
            raise ValueError("split must be train, val or test")
        target = first_split[first_split["split"] == split][cols].reset_index(drop=True)
    if target.empty:
        raise ValueError(f"no labelled cells in the {split if not data_dir else data_dir} set")
    simple = len(run_ids) == 1 and not tta and not data_dir and split in ("val", "test")
    pred_file = store.run_dir(run_ids[0]) / "predictions.csv"
    if simple and pred_file.exists():  # written by the trainer from best.keras: no need to predict again
        stored = pd.read_csv(pred_file, dtype={"subject": "str"})
        stored["path"] = relocate(stored["path"], first_split.attrs.get("stored_root"), data_root)
        stored = stored.set_index("path")["prob_all"]
        val["prob_all"], target["prob_all"] = stored.loc[val["path"]].to_numpy(), stored.loc[target["path"]].to_numpy()
    else:
        _require_files(first_split["path"], f"run {run_ids[0]}'s split (data root "
                                            f"{first_split.attrs.get('data_root')})")
        models = [load_model(str(run_model_path(store, r))) for r in run_ids]
        size = int(models[0].inputs[0].shape[1])
        split_cache = _cached_crops(first_split, size, first_cfg.cache_dir, first_cfg.crop_margin)
        target_cache = _cached_crops(target, size, first_cfg.cache_dir, first_cfg.crop_margin) if data_dir \
            else split_cache
        val["prob_all"] = _predict(models, split_cache, val["path"], tta)
        target["prob_all"] = _predict(models, target_cache, target["path"], tta)
    provenance = {"runs": list(run_ids), "split": split if not data_dir else "external",
                  "split_strategy": first_cfg.split, "tta": tta,
                  "data_dir": data_dir or first_split.attrs.get("data_root") or first_cfg.data_dir,
                  "architectures": [store.get_run(r)["architecture"] for r in run_ids]}
    if first_cfg.split == "image" and not data_dir:
        provenance["warning"] = "image-level split: subjects leak between splits; optimistic"
    from core.data.splits import split_warnings

    provenance["split_warnings"] = split_warnings(first_split)  # a split lacking a class, in plain words
    return val, target, provenance


def evaluate(store: RunStore, run_ids: Sequence[str], split: str = "test", data_dir: str | None = None,
             tta: bool = False, target_sensitivity: float | None = None, band: float = 0.1,
             n_boot: int = 1000, seed: int = 0, data_root: str | None = None,
             label_overrides: str | None = None) -> dict[str, Any]:
    """Evaluate one run or an ensemble; writes the artefacts and returns metrics.json's content.
    `data_root`: the runs' dataset folder if it moved since training (paths are stored relative to it).
    `label_overrides`: a reviewers' corrections CSV applied to the labels scored against (artefacts then go to a
    `with_overrides/` sub-folder, so the figures with and without them sit side by side)."""
    run_ids = list(run_ids)
    val, target, provenance = collect_predictions(store, run_ids, split, data_dir, tta, data_root)
    out_dir = store.run_dir(run_ids[0]) if len(run_ids) == 1 else \
        store.root / "ensembles" / hashlib.sha1("|".join(sorted(run_ids)).encode()).hexdigest()[:12]
    if label_overrides:
        from core.data.labels import apply_overrides, load_overrides

        table = load_overrides(label_overrides)
        val, _ = apply_overrides(val.assign(name=[Path(p).name for p in val["path"]]), table)
        target, changed = apply_overrides(target.assign(name=[Path(p).name for p in target["path"]]), table)
        val, target = val.drop(columns=["name", "label_overridden"]), target.drop(columns=["name", "label_overridden"])
        provenance["label_overrides"] = {"file": str(label_overrides), "labels_changed": changed}
        out_dir = out_dir / "with_overrides"
    out_dir.mkdir(parents=True, exist_ok=True)
    yv = (val["label"] == "all").to_numpy().astype(int)
    # the run's own per-subject correction setting (RunConfig.subject_correction), as its training fitted it
    weight = float(store.get_run(run_ids[0])["config"].get("subject_correction", 0.0))
    if len(np.unique(yv)) == 2:
        rule = cal.DecisionRule.fit(yv, val["prob_all"].to_numpy(), target_sensitivity, band,
                                    fitted_on=f"validation split of run {', '.join(run_ids)} ({len(val)} cells, "
                                              f"{val['subject'].nunique()} subjects)",
                                    subject_weight=weight, subjects=val["subject"])
    else:
        missing = [c for c in CLASSES if c not in set(val["label"])]
        why = "has no cells" if val.empty else f"has no {' or '.join(missing)} cells"
        rule = cal.DecisionRule(band=band, fitted_on=f"none: the validation split {why}, so the rule keeps its "
                                                     "defaults (threshold 0.5, temperature 1)", subject_weight=weight)
        log.warning("decision rule not fitted: the validation split %s; defaults kept", why)
    rule.save(out_dir / "calibration.json")
    decided = rule.decide(target["prob_all"].to_numpy(), subjects=target["subject"])
    target = pd.concat([target, decided], axis=1)
    scored = target.assign(prob_all=target["prob_all_calibrated"])
    result = evaluate_predictions(scored, threshold=rule.threshold, n_boot=n_boot, seed=seed, provenance=provenance)
    y = (target["label"] == "all").to_numpy().astype(int)
    result["calibration"] = {
        "rule": rule.__dict__,
        "ece_raw": cal.expected_calibration_error(y, target["prob_all"]),
        "ece_calibrated": cal.expected_calibration_error(y, target["prob_all_calibrated"]),
        "brier_raw": cal.brier_score(y, target["prob_all"]),
        "brier_calibrated": cal.brier_score(y, target["prob_all_calibrated"]),
        "reliability": cal.reliability_curve(y, target["prob_all_calibrated"]).to_dict(orient="list"),
        "uncertain_cells": int(target["uncertain"].sum()),
    }
    name = provenance["split"]
    target.to_csv(out_dir / f"predictions_{name}.csv", index=False)
    report_table(scored, rule.threshold).to_csv(out_dir / "report.csv", index_label="class")
    subject_readout(scored, rule.threshold).to_csv(out_dir / "subjects.csv", index=False)
    fp, fn = error_tables(scored.assign(prob_all=target["prob_all"]), threshold=_raw_threshold(rule))
    pd.concat([fp.assign(error="false_positive"), fn.assign(error="false_negative")]).to_csv(
        out_dir / "errors.csv", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
    write_figures(result, out_dir)
    return result


def _raw_threshold(rule: cal.DecisionRule) -> float:
    """The raw-probability threshold equivalent to the rule's calibrated one (temperature is monotone)."""
    t = np.clip(rule.threshold, 1e-7, 1 - 1e-7)
    return float(1 / (1 + np.exp(-np.log(t / (1 - t)) * rule.temperature)))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def write_figures(result: dict[str, Any], out_dir: Path) -> None:
    """Confusion matrix, ROC, PR and reliability figures as PNG (for reports; the dashboard draws its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prov = result["provenance"]
    caption = f"{prov['split']} split ({prov.get('split_strategy')}), {prov['cells']} cells, " \
              f"{len(prov['subjects'])} subjects"
    cm = np.array(result["confusion_matrix"]["counts"])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["Hem", "All"], yticklabels=["Hem", "All"],
           xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.text(0.5, 0.01, caption, ha="center", fontsize=6)
    fig.savefig(out_dir / "confusion.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    if result.get("curves"):
        for kind, (xk, yk, xl, yl) in {"roc": ("fpr", "tpr", "false positive rate", "true positive rate"),
                                       "pr": ("recall", "precision", "recall (all)", "precision (all)")}.items():
            c = result["curves"][kind]
            fig, ax = plt.subplots(figsize=(4, 3.6))
            ax.plot(c[xk], c[yk])
            auc = result["metrics"]["roc_auc" if kind == "roc" else "pr_auc"]
            ax.set(xlabel=xl, ylabel=yl, title=f"{kind.upper()} (AUC {auc:.3f})", xlim=(0, 1), ylim=(0, 1.02))
            fig.text(0.5, 0.01, caption, ha="center", fontsize=6)
            fig.savefig(out_dir / f"{kind}.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
    rel = result["calibration"]["reliability"]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot(rel["mean_predicted"], rel["fraction_positive"], "o-")
    ax.set(xlabel="mean calibrated P(all)", ylabel="fraction of blasts", title="Reliability", xlim=(0, 1),
           ylim=(0, 1))
    fig.text(0.5, 0.01, caption, ha="center", fontsize=6)
    fig.savefig(out_dir / "reliability.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def evaluate_model_folder(ref: str, data_dir: str, out_dir: str | Path | None = None, tta: bool = False,
                          n_boot: int = 1000, seed: int = 0, cache_dir: str = "cache") -> dict[str, Any]:
    """Evaluate a model folder (or a shipped name: `starter`, `smear`) on a labelled folder with the folder's own
    decision rule, unchanged (nothing is fitted on the data being judged), on crops cut with its card's margin.
    Writes metrics.json and predictions_external.csv into `out_dir` (default
    `runs/evaluations/<model>-<data hash>`) and returns metrics.json's content."""
    from core.data.dataset import index
    from core.decide.inference import predict_proba
    from core.decide.model_folder import load_model_folder

    mf = load_model_folder(ref)
    manifest, problems = index(data_dir)
    target = manifest[manifest["label"].notna()][["path", "subject", "label"]].reset_index(drop=True)
    if target.empty:
        raise ValueError(f"{data_dir}: no labelled cells (all/hem folders, UID_ names or a label CSV) to evaluate on")
    cache = _cached_crops(target, mf.size, cache_dir, margin=mf.crop_margin)  # the card's margin (smear: 0)
    ok = cache.valid[cache.rows(target["path"])]
    target = target[ok].reset_index(drop=True)
    crops = np.asarray(cache.array[cache.rows(target["path"])])
    target["prob_all"] = predict_proba(mf.models, crops, tta=tta)
    if mf.gate is not None:  # what the gate would refuse (metrics below still cover every cell)
        from core.decide.gate import REASONS, feature_model, features_and_probs
        from core.data.imageio import read_image

        reasons = [mf.gate.image.check(read_image(p)) if mf.gate.image is not None else None
                   for p in target["path"]]
        if mf.gate.novelty is not None:
            novel = mf.gate.novelty.novel(features_and_probs(feature_model(mf.model), crops)[0])
            reasons = [r or ("novel" if n else None) for r, n in zip(reasons, novel)]
        target["ood_reason"] = [REASONS[r] if r else None for r in reasons]
    decided = mf.rule.decide(target["prob_all"].to_numpy(), subjects=target["subject"])
    target = pd.concat([target, decided], axis=1)
    name = mf.card.get("name") or mf.folder.name
    provenance = {"model": name, "model_folder": str(mf.folder), "split": "external", "split_strategy": "external",
                  "data_dir": str(data_dir), "tta": tta, "excluded_files": int(len(problems) + (~ok).sum()),
                  "rule": f"{mf.rule.fitted_on} (not refitted)",
                  "not_assessed_by_gate": None if mf.gate is None else int(target["ood_reason"].notna().sum())}
    scored = target.assign(prob_all=target["prob_all_calibrated"])
    result = evaluate_predictions(scored, threshold=mf.rule.threshold, n_boot=n_boot, seed=seed,
                                  provenance=provenance)
    y = (target["label"] == "all").to_numpy().astype(int)
    result["calibration"] = {"rule": mf.rule.__dict__, "uncertain_cells": int(target["uncertain"].sum()),
                             "ece_calibrated": cal.expected_calibration_error(y, target["prob_all_calibrated"]),
                             "brier_calibrated": cal.brier_score(y, target["prob_all_calibrated"])}
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    out = Path(out_dir) if out_dir else Path("runs") / "evaluations" / f"{name}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    target.to_csv(out / "predictions_external.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
    result["out_dir"] = str(out)
    return result
