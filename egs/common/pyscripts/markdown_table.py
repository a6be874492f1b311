"""GitHub markdown tables, the one format of every table the recipes write.

A row is a mapping from column name to value; a cell shows an ``int`` with thousands separators
(``4,743,240``), an empty value (``""`` or ``None``) as ``-``, and anything else as ``str(value)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

EMPTY = "-"


def cell(value: object) -> str:
    """One cell's text: ``1,234`` for an int, ``-`` for an empty value, else ``str(value)``."""
    if value is None or value == "":
        return EMPTY
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> list[str]:
    """The table's lines: a header of ``columns`` (default: the first row's keys), the separator and
    one line per row (a column a row lacks shows as empty)."""
    if columns is None:
        if not rows:
            raise ValueError("a table without rows needs its columns named")
        columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return lines
