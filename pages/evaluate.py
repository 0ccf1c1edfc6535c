"""Evaluate: the report's table, challenge metric with subject-level CIs, curves, calibration, subjects."""
import pandas as pd
import streamlit as st

from dashboard import auth, charts, services
from dashboard.settings import Settings

KEYS = {"weighted_f1": "Weighted F1 (challenge)", "balanced_accuracy": "Balanced accuracy",
        "sensitivity_all": "Sensitivity (all)", "specificity_all": "Specificity (all)", "roc_auc": "ROC AUC",
        "pr_auc": "PR AUC"}


@st.cache_data(show_spinner="Evaluating…", max_entries=32)
def evaluation(runs_dir: str, run_ids: tuple[str, ...], stamp: float, with_overrides: bool = False) -> dict:
    return services.evaluation(runs_dir, list(run_ids), with_overrides=with_overrides)


def runs_ui(settings: Settings) -> list[str]:
    runs = services.completed_runs(settings.runs_dir)
    if runs.empty:
        st.info("No completed run to evaluate yet: train one on the Train page.")
        return []
    labels = {services.run_label(r): r["id"] for r in runs.to_dict("records")}
    chosen = st.multiselect("Runs (several: compared side by side, and evaluated as an ensemble)", list(labels),
                            default=list(labels)[:1])
    return [labels[c] for c in chosen]


def metrics_ui(result: dict, split_warnings: list[str] | None = None) -> None:
    prov = result["provenance"]
    st.caption(f"Runs {', '.join(prov['runs'])} · {prov['split']} split ({prov['split_strategy']}) · "
               f"{prov['cells']} cells from {len(prov['subjects'])} subjects · data {prov['data_dir']}"
               + (" · TTA" if prov.get("tta") else ""))
    if prov.get("warning"):
        st.warning(prov["warning"])
    for w in split_warnings if split_warnings is not None else prov.get("split_warnings", []):
        st.warning(f"Split: {w}.")
    if services.headline_defined(result):
        st.markdown(f"**Headline:** {services.headline(result)}")
    else:
        st.error(services.headline(result))
    rule = result["calibration"]["rule"]
    st.info(f"Decision rule in force: threshold {rule['threshold']:.3f} on calibrated P(blast) (temperature "
            f"{rule['temperature']:.3f}"
            + (f", chosen for sensitivity {rule['target_sensitivity']:.2f}" if rule.get("target_sensitivity") else "")
            + f"), review band ±{rule['band']:.2f}; fitted on {rule['fitted_on']}.")
    ci = result["ci95_by_subject_bootstrap"]
    cols = st.columns(len(KEYS))
    for col, (key, label) in zip(cols, KEYS.items()):
        text = services.metric_text(result, key)
        if text.startswith("undefined"):  # said with its reason, never as nan
            col.metric(label, "undefined", help=text)
            col.caption(text)
            continue
        lo, hi = ci.get(key, (float("nan"), float("nan")))
        ci_text = f"{lo:.3f}–{hi:.3f}" if lo == lo and hi == hi else "not computed"
        col.metric(label, text, help=f"95% CI by subject bootstrap: {ci_text}")
        col.caption(f"CI {ci_text}")
    c1, c2 = st.columns(2)
    c1.plotly_chart(charts.confusion_heatmap(result["confusion_matrix"]["counts"], "Confusion matrix"))
    c2.dataframe(services.report_view(result))
    if result.get("curves"):
        c1, c2, c3 = st.columns(3)
        roc, pr = result["curves"]["roc"], result["curves"]["pr"]
        c1.plotly_chart(charts.curve(roc["fpr"], roc["tpr"], f"ROC (AUC {result['metrics']['roc_auc']:.3f})",
                                     "false positive rate", "sensitivity", diagonal=True))
        c2.plotly_chart(charts.curve(pr["recall"], pr["precision"], f"PR (AUC {result['metrics']['pr_auc']:.3f})",
                                     "recall (all)", "precision (all)"))
        c3.plotly_chart(charts.reliability(result["calibration"]["reliability"]))


def threshold_ui(settings: Settings, run_id: str, result: dict) -> None:
    preds = services.predictions(settings.runs_dir, run_id)
    if preds.empty:
        return
    thr = st.slider("Decision threshold on calibrated P(blast)", 0.0, 1.0, float(result["threshold"]), 0.01)
    m = services.tradeoff_text(preds, thr)
    for col, (key, label) in zip(st.columns(3), {"sensitivity_all": "Sensitivity (all)",
                                                 "specificity_all": "Specificity (all)",
                                                 "accuracy": "Accuracy"}.items()):
        if m[key].startswith("undefined"):
            col.metric(label, "undefined", help=m[key])
            col.caption(m[key])
        else:
            col.metric(label, m[key])
    st.subheader("Per subject")
    st.dataframe(services.subjects_table(settings.runs_dir, run_id), hide_index=True)


def main() -> None:
    auth.current_actor()  # signed in (or local mode), else the sign-in page and a stop
    settings = Settings.from_env()
    st.title("Evaluate")
    run_ids = runs_ui(settings)
    if not run_ids:
        return
    if len(run_ids) > 1:
        results = {r: evaluation(str(settings.runs_dir), (r,), 0.0) for r in run_ids}
        rows = {r: {label: services.metric_text(res, key, 4) for key, label in KEYS.items()}
                for r, res in results.items()}
        st.subheader("Comparison (test split)")
        st.dataframe(pd.DataFrame(rows).T)
        st.subheader("Ensemble (averaged probabilities)")
    n_over = len(services.label_overrides(settings.runs_dir))
    corrected = st.toggle(f"Score against the reviewers' corrected labels ({n_over} overrides)", False,
                          disabled=n_over == 0, help="the same predictions, scored with and without the label "
                                                     "corrections recorded on the Misclassified page")
    stamp = float(len(services.label_reviews(settings.runs_dir))) if corrected else 0.0
    result = evaluation(str(settings.runs_dir), tuple(run_ids), stamp, corrected)
    if corrected:
        lo = result["provenance"]["label_overrides"]
        st.info(f"Labels: {lo['labels_changed']} of these cells scored with a reviewer's corrected label.")
    metrics_ui(result, services.run_split_warnings(settings.runs_dir, run_ids[0]))
    if len(run_ids) == 1:
        threshold_ui(settings, run_ids[0], result)
        if st.button("Build the run report (HTML)"):
            st.download_button("Download the run report", services.run_report(settings.runs_dir, run_ids[0]),
                               f"report_{run_ids[0]}.html", "text/html")


main()
