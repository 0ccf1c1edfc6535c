"""Plotly figures for the pages: the same builders as the HTML run report (`training.figures`)."""
from training.figures import class_counts, confusion_heatmap, curve, reliability, training_curves  # noqa: F401
