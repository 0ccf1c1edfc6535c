"""Plotly figures of runs and datasets (the dashboard pages and the HTML run report draw the same ones), built from
the arrays and tables the library returns."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def training_curves(epochs: pd.DataFrame) -> go.Figure:
    """Accuracy and loss, train vs validation, and the learning rate, per epoch (1-based)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("Accuracy", "Loss", "Learning rate"))
    x = epochs["epoch"] + 1
    for col, (name, dash) in enumerate([("", "solid"), ("val_", "dot")]):
        label = "validation" if name else "train"
        fig.add_trace(go.Scatter(x=x, y=epochs[f"{name}accuracy"], name=f"{label} accuracy",
                                 line={"dash": dash}), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=epochs[f"{name}loss"], name=f"{label} loss", line={"dash": dash}),
                      row=1, col=2)
    fig.add_trace(go.Scatter(x=x, y=epochs["learning_rate"], name="learning rate"), row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_xaxes(title_text="epoch")
    # the legend sits above the subplot titles: a horizontal legend's default place, under the plot, covers
    # the "epoch" axis titles
    fig.update_layout(height=360, margin={"t": 80, "b": 40, "l": 30, "r": 10},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.14, "xanchor": "left", "x": 0})
    return fig


def confusion_heatmap(counts, title: str) -> go.Figure:
    z = np.asarray(counts)
    fig = go.Figure(go.Heatmap(z=z, x=["Hem", "All"], y=["Hem", "All"], colorscale="Blues", text=z,
                               texttemplate="%{text}", showscale=False))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", height=340,
                      yaxis={"autorange": "reversed"}, margin={"t": 50, "b": 40})
    return fig


def curve(x, y, title: str, xlabel: str, ylabel: str, diagonal: bool = False) -> go.Figure:
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", name=title))
    if diagonal:
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                                 name="chance / ideal"))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, height=340, showlegend=False,
                      xaxis={"range": [0, 1]}, yaxis={"range": [0, 1.02]}, margin={"t": 50, "b": 40})
    return fig


def reliability(rel: dict) -> go.Figure:
    fig = curve(rel["mean_predicted"], rel["fraction_positive"], "Reliability (calibrated)",
                "mean predicted P(all)", "fraction of blasts", diagonal=True)
    fig.update_traces(mode="lines+markers", selector={"name": "Reliability (calibrated)"})
    return fig


def class_counts(table: pd.DataFrame, title: str) -> go.Figure:
    fig = go.Figure([go.Bar(name=c, x=table.index.astype(str), y=table[c]) for c in table.columns])
    fig.update_layout(barmode="group", title=title, height=320, margin={"t": 50, "b": 40})
    return fig
