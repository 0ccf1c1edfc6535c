"""Dashboard support: settings, services the pages call, and Plotly figures. Pages stay thin."""
