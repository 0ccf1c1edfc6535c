"""One self-contained HTML document per run: what a researcher shares instead of a folder of CSV and PNG files.

Sections: the run (config, device, status), data and split provenance, training curves, the evaluation (metrics
with subject CIs, the report's per-class table, confusion matrix, ROC/PR, reliability and the decision rule in
force), the per-subject read-out and the most confident errors with their crops. Plotly figures are inline and
plotly.js is embedded once, so the file opens without network access.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.store import RunStore

SECTIONS = ("Run", "Data and split", "Training curves", "Evaluation", "Calibration and decision rule",
            "Subjects", "Most confident errors")
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.banner{background:#fff4e5;border:1px solid #f0b060;padding:.6em 1em}.grid{display:flex;flex-wrap:wrap;gap:10px}
.grid figure{margin:0;width:170px;font-size:.75em}.grid img{width:170px;image-rendering:pixelated}
.figs{display:flex;flex-wrap:wrap}.figs>div{flex:1 1 350px}"""


def _table(df: pd.DataFrame, index: bool = False, digits: int = 4) -> str:
    return df.to_html(index=index, float_format=lambda v: f"{v:.{digits}f}", border=0, na_rep="")


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def report_html(store: RunStore, run_id: str, n_errors: int = 12, n_boot: int = 500) -> str:
    """The run's report as one HTML string (evaluates the run first if it has no metrics.json yet)."""
    import plotly.offline

    from core.decide.metrics import headline, metric_text, report_view, undefined_of
    from core.image.preprocessing import load_crop
    from training import figures
    from training.evaluate import crop_margin_of, evaluate

    run = store.get_run(run_id)
    if run["status"] != "completed":
        raise ValueError(f"run {run_id} is {run['status']}: a report needs a completed run")
    folder = store.run_dir(run_id)
    metrics_path = folder / "metrics.json"
    result: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.exists() else \
        evaluate(store, [run_id], n_boot=n_boot)
    prov, m = result["provenance"], result["metrics"]
    cfg = run["config"]
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    parts = [f"<h1>Run {html.escape(run_id)} {html.escape(run['name'] or '')}</h1>",
             '<p class="banner"><b>Research use only, not a diagnostic device.</b> Every figure below comes from '
             f"the {html.escape(str(prov['split']))} split of the data named here; figures on synthetic cells say "
             "nothing about real patients.</p>"]

    parts.append("<h2>Run</h2>")
    facts = {"status": run["status"], "architecture": run["architecture"], "device": run["device"],
             "epochs trained": summary.get("epochs_trained"), "batches trained": summary.get("batches_trained"),
             "best validation accuracy": summary.get("best_val_accuracy"),
             "labels overridden": summary.get("labels_overridden", 0)}
    shown = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in facts.values()]
    parts.append(_table(pd.DataFrame({"": list(facts), "value": shown})))
    parts.append("<details><summary>Resolved configuration (config.json)</summary><pre>"
                 + html.escape(json.dumps(cfg, indent=2, sort_keys=True)) + "</pre></details>")

    parts.append("<h2>Data and split</h2>")
    split = pd.read_csv(folder / "split.csv", dtype=str) if (folder / "split.csv").exists() else pd.DataFrame()
    parts.append(f"<p>Data: <code>{html.escape(str(prov.get('data_dir')))}</code>; split strategy "
                 f"<b>{html.escape(str(prov.get('split_strategy')))}</b>; evaluated on the "
                 f"<b>{html.escape(str(prov['split']))}</b> set: {prov['cells']} cells of {len(prov['subjects'])} "
                 "subjects.</p>")
    if prov.get("warning"):
        parts.append(f"<p class='banner'>{html.escape(prov['warning'])}</p>")
    if len(split):
        counts = pd.crosstab(split["split"], split["label"]).reindex(["train", "val", "test"]).dropna(how="all")
        subjects = split.groupby(["split", "label"])["subject"].nunique().unstack(fill_value=0).add_prefix("subjects ")
        parts.append(_table(counts.join(subjects).fillna(0).astype(int), index=True))
        from core.data.splits import split_warnings

        for w in split_warnings(split):
            parts.append(f"<p class='banner'>Split: {html.escape(w)}.</p>")

    parts.append("<h2>Training curves</h2>")
    epochs = store.epochs(run_id)
    parts.append(_figure(figures.training_curves(epochs)) if len(epochs) else "<p>No epochs recorded.</p>")

    parts.append("<h2>Evaluation</h2>")
    ci = result.get("ci95_by_subject_bootstrap", {})
    keys = ["weighted_f1", "balanced_accuracy", "sensitivity_all", "specificity_all", "roc_auc", "pr_auc", "accuracy"]
    undefined = undefined_of(result)
    parts.append(f"<p class='banner'>{html.escape(headline(result))}</p>" if undefined.get("weighted_f1") else
                 f"<p><b>Headline:</b> {html.escape(headline(result))}</p>")
    rows = [{"metric": k, "value": metric_text(result, k, 4),
             "95% CI by subject": (f"{ci[k][0]:.4f} – {ci[k][1]:.4f}" if k in ci and k not in undefined else "")}
            for k in keys if k in m]
    parts.append(_table(pd.DataFrame(rows)))
    parts.append("<p>The report's per-class table:</p>" + _table(report_view(result), index=True))
    figs = [figures.confusion_heatmap(result["confusion_matrix"]["counts"], "Confusion matrix")]
    if result.get("curves"):
        roc, pr = result["curves"]["roc"], result["curves"]["pr"]
        figs += [figures.curve(roc["fpr"], roc["tpr"], f"ROC (AUC {m['roc_auc']:.3f})", "false positive rate",
                               "sensitivity", diagonal=True),
                 figures.curve(pr["recall"], pr["precision"], f"PR (AUC {m['pr_auc']:.3f})", "recall (all)",
                               "precision (all)")]
    parts.append('<div class="figs">' + "".join(f"<div>{_figure(f)}</div>" for f in figs) + "</div>")

    parts.append("<h2>Calibration and decision rule</h2>")
    cal = result["calibration"]
    rule = cal["rule"]
    parts.append(f"<p>Threshold {rule['threshold']:.3f} on calibrated P(blast), temperature "
                 f"{rule['temperature']:.3f}, review band ±{rule['band']:.2f}; fitted on "
                 f"{html.escape(str(rule['fitted_on']))}. ECE {cal.get('ece_raw', float('nan')):.4f} raw → "
                 f"{cal['ece_calibrated']:.4f} calibrated; {cal['uncertain_cells']} cells flagged for review.</p>")
    parts.append(_figure(figures.reliability(cal["reliability"])))

    parts.append("<h2>Subjects</h2>")
    subj = folder / "subjects.csv"
    parts.append(_table(pd.read_csv(subj, dtype={"subject": str})) if subj.exists() else "<p>No subject table.</p>")

    parts.append("<h2>Most confident errors</h2>")
    errors = folder / "errors.csv"
    table = pd.read_csv(errors, dtype={"subject": str}) if errors.exists() else pd.DataFrame()
    if table.empty:
        parts.append("<p>No misclassified cells on this split.</p>")
    else:
        table["confidence"] = np.where(table["error"] == "false_positive", table["prob_all"], 1 - table["prob_all"])
        margin = crop_margin_of(run_id, store)
        cards = []
        for row in table.sort_values("confidence", ascending=False).head(n_errors).itertuples():
            try:
                img = f"<img src='{_png(load_crop(row.path, size=120, margin=margin))}' alt='{Path(row.path).name}'>"
            except (OSError, ValueError):
                img = "<p><b>missing</b></p>"
            cards.append(f"<figure>{img}<figcaption>{html.escape(row.error.replace('_', ' '))} · "
                         f"{html.escape(str(row.subject))} · P(blast) {row.prob_all:.2f}<br>"
                         f"{html.escape(Path(row.path).name)}</figcaption></figure>")
        parts.append(f"<p>{int((table['error'] == 'false_positive').sum())} false positives, "
                     f"{int((table['error'] == 'false_negative').sum())} false negatives; the {len(cards)} most "
                     "confident shown.</p><div class='grid'>" + "".join(cards) + "</div>")

    plotly_js = plotly.offline.get_plotlyjs()
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Run " + html.escape(run_id) + "</title>"
            f"<style>{_CSS}</style><script>{plotly_js}</script></head><body>" + "\n".join(parts) + "</body></html>")


def write_report(store: RunStore, run_id: str, out: str | Path | None = None) -> Path:
    """Write the report (default `<run>/report.html`) and return its path."""
    path = Path(out) if out else store.run_dir(run_id) / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report_html(store, run_id), encoding="utf-8")
    tmp.replace(path)
    return path
