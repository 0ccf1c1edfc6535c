"""CSV that a spreadsheet opens as data, never as formulas: the pages' way to `core.data.csv_export` (pages reach
the library only through dashboard)."""
from core.data.csv_export import FORMULA_STARTS, escape_cell, escape_cells, safe_csv  # noqa: F401 - re-exported
