"""One self-contained HTML document per run: what a researcher shares instead of a folder of CSV and PNG files.

Sections: the run (config, device, status), data and split provenance, training curves, the evaluation (metrics
with subject CIs, the report's per-class table, confusion matrix, ROC/PR, reliability and the decision rule in
force), the per-subject read-out and the most confident errors with their crops. Plotly figures are inline and
plotly.js is embedded once, so the file opens without network access. The page is `templates/run_report.html`
filled by `string.Template`, one small helper per section; every text from a run, a file or a user is escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pandas as pd

from training.store import RunStore

SECTIONS = ("Run", "Data and split", "Training curves", "Evaluation", "Calibration and decision rule",
            "Subjects", "Most confident errors")
# the page: its CSS, headings (SECTIONS, in order) and fixed text; `report_html` fills its $slots, every text from a
# user or a file escaped (html.escape, or pandas' to_html, which escapes)
TEMPLATE = Path(__file__).resolve().parent / "templates" / "run_report.html"
METRIC_KEYS = ("weighted_f1", "balanced_accuracy", "sensitivity_all", "specificity_all", "roc_auc", "pr_auc",
               "accuracy")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(df: pd.DataFrame, index: bool = False, digits: int = 4) -> str:
    return df.to_html(index=index, float_format=lambda v: f"{v:.{digits}f}", border=0, na_rep="")


def _banner(text: str) -> str:
    """A highlighted paragraph (`text` already escaped): warnings, and a headline that is not a number."""
    return f"<p class='banner'>{text}</p>"


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def report_html(store: RunStore, run_id: str, n_errors: int = 12, n_boot: int = 500) -> str:
    """The run's report as one HTML string (evaluates the run first if it has no metrics.json yet): the page a
    researcher shares instead of a run folder, filled from `templates/run_report.html`."""
    import plotly.offline

    from training.evaluate import evaluate

    run = store.get_run(run_id)
    if run["status"] != "completed":
        raise ValueError(f"run {run_id} is {run['status']}: a report needs a completed run")
    folder = store.run_dir(run_id)
    metrics = folder / "metrics.json"
    result: dict[str, Any] = _read_json(metrics) if metrics.exists() else evaluate(store, [run_id], n_boot=n_boot)
    prov = result["provenance"]
    epochs = store.epochs(run_id)
    return Template(TEMPLATE.read_text(encoding="utf-8").rstrip("\n")).substitute(
        title_run_id=_e(run_id), run_id=_e(run_id), run_name=_e(run["name"] or ""), split=_e(prov["split"]),
        plotly_js=plotly.offline.get_plotlyjs(),
        run_facts=_run_facts(run, _read_json(folder / "summary.json")),
        config_json=_e(json.dumps(run["config"], indent=2, sort_keys=True)),
        data_and_split=_data_and_split(prov, folder / "split.csv"),
        training_curves=_training_curves(epochs),
        evaluation=_evaluation(result),
        calibration=_calibration(result["calibration"]),
        subjects=_subjects(folder / "subjects.csv"),
        errors=_errors(store, run_id, folder / "errors.csv", n_errors))


def _run_facts(run: dict, summary: dict) -> str:
    """The run in one table: status, architecture, device and what training did."""
    facts = {"status": run["status"], "architecture": run["architecture"], "device": run["device"],
             "epochs trained": summary.get("epochs_trained"), "batches trained": summary.get("batches_trained"),
             "best validation accuracy": summary.get("best_val_accuracy"),
             "labels overridden": summary.get("labels_overridden", 0)}
    shown = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in facts.values()]
    return _table(pd.DataFrame({"": list(facts), "value": shown}))


def _data_and_split(prov: dict, split_csv: Path) -> str:
    """Where the data came from, how it was split and what the split warns about."""
    from core.data.splits import split_warnings

    parts = [f"<p>Data: <code>{_e(prov.get('data_dir'))}</code>; split strategy "
             f"<b>{_e(prov.get('split_strategy'))}</b>; evaluated on the "
             f"<b>{_e(prov['split'])}</b> set: {prov['cells']} cells of {len(prov['subjects'])} subjects.</p>"]
    if prov.get("warning"):
        parts.append(_banner(_e(prov["warning"])))
    split = pd.read_csv(split_csv, dtype=str) if split_csv.exists() else pd.DataFrame()
    if len(split):
        counts = pd.crosstab(split["split"], split["label"]).reindex(["train", "val", "test"]).dropna(how="all")
        subjects = split.groupby(["split", "label"])["subject"].nunique().unstack(fill_value=0).add_prefix("subjects ")
        parts.append(_table(counts.join(subjects).fillna(0).astype(int), index=True))
        parts += [_banner(f"Split: {_e(w)}.") for w in split_warnings(split)]
    return "\n".join(parts)


def _training_curves(epochs: pd.DataFrame) -> str:
    from training import figures

    return _figure(figures.training_curves(epochs)) if len(epochs) else "<p>No epochs recorded.</p>"


def _evaluation(result: dict) -> str:
    """The headline, metrics with their subject CIs, the per-class table and the confusion, ROC and PR figures."""
    from core.decide.metrics import headline, metric_text, report_view, undefined_of
    from training import figures

    m, ci = result["metrics"], result.get("ci95_by_subject_bootstrap", {})
    undefined = undefined_of(result)
    rows = [{"metric": k, "value": metric_text(result, k, 4),
             "95% CI by subject": (f"{ci[k][0]:.4f} – {ci[k][1]:.4f}" if k in ci and k not in undefined else "")}
            for k in METRIC_KEYS if k in m]
    figs = [figures.confusion_heatmap(result["confusion_matrix"]["counts"], "Confusion matrix")]
    if result.get("curves"):
        roc, pr = result["curves"]["roc"], result["curves"]["pr"]
        figs += [figures.curve(roc["fpr"], roc["tpr"], f"ROC (AUC {m['roc_auc']:.3f})", "false positive rate",
                               "sensitivity", diagonal=True),
                 figures.curve(pr["recall"], pr["precision"], f"PR (AUC {m['pr_auc']:.3f})", "recall (all)",
                               "precision (all)")]
    return "\n".join([
        _banner(_e(headline(result))) if undefined.get("weighted_f1") else
        f"<p><b>Headline:</b> {_e(headline(result))}</p>",
        _table(pd.DataFrame(rows)),
        "<p>The report's per-class table:</p>" + _table(report_view(result), index=True),
        '<div class="figs">' + "".join(f"<div>{_figure(f)}</div>" for f in figs) + "</div>"])


def _calibration(cal: dict) -> str:
    """The decision rule in force and the reliability diagram."""
    from training import figures

    rule = cal["rule"]
    return (f"<p>Threshold {rule['threshold']:.3f} on calibrated P(blast), temperature "
            f"{rule['temperature']:.3f}, review band ±{rule['band']:.2f}; fitted on "
            f"{_e(rule['fitted_on'])}. ECE {cal.get('ece_raw', float('nan')):.4f} raw → "
            f"{cal['ece_calibrated']:.4f} calibrated; {cal['uncertain_cells']} cells flagged for review.</p>\n"
            + _figure(figures.reliability(cal["reliability"])))


def _subjects(subjects_csv: Path) -> str:
    if not subjects_csv.exists():
        return "<p>No subject table.</p>"
    return _table(pd.read_csv(subjects_csv, dtype={"subject": str}))


def _errors(store: RunStore, run_id: str, errors_csv: Path, n_errors: int) -> str:
    """The most confident errors, each with its crop, as the model saw it."""
    from training.evaluate import crop_margin_of

    table = pd.read_csv(errors_csv, dtype={"subject": str}) if errors_csv.exists() else pd.DataFrame()
    if table.empty:
        return "<p>No misclassified cells on this split.</p>"
    table["confidence"] = np.where(table["error"] == "false_positive", table["prob_all"], 1 - table["prob_all"])
    margin = crop_margin_of(run_id, store)
    cards = [_error_card(row, margin) for row in table.sort_values("confidence", ascending=False).head(n_errors).itertuples()]
    return (f"<p>{int((table['error'] == 'false_positive').sum())} false positives, "
            f"{int((table['error'] == 'false_negative').sum())} false negatives; the {len(cards)} most "
            "confident shown.</p><div class='grid'>" + "".join(cards) + "</div>")


def _error_card(row, margin: int) -> str:
    """One misclassified cell: its crop (or `missing`), the error, subject, P(blast) and file name."""
    from core.image.preprocessing import load_crop

    name = Path(row.path).name
    try:
        img = f"<img src='{_png(load_crop(row.path, size=120, margin=margin))}' alt='{_e(name)}'>"
    except (OSError, ValueError):
        img = "<p><b>missing</b></p>"
    return (f"<figure>{img}<figcaption>{_e(row.error.replace('_', ' '))} · {_e(row.subject)} · "
            f"P(blast) {row.prob_all:.2f}<br>{_e(name)}</figcaption></figure>")


def write_report(store: RunStore, run_id: str, out: str | Path | None = None) -> Path:
    """Write the report (default `<run>/report.html`) in one step (`core.data.atomic`: a reader never sees half a
    page) and return its path."""
    from core.data.atomic import atomic_write_text

    path = Path(out) if out else store.run_dir(run_id) / "report.html"
    return atomic_write_text(path, report_html(store, run_id))
