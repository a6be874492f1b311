"""The recipes' one markdown table writer."""

import pytest
from markdown_table import markdown_table


def test_table_of_rows_formats_ints_and_empty_cells() -> None:
    rows = [{"method": "full", "params": 4743240, "WER": 55.44, "note": ""}, {"method": "lora", "params": 0}]
    assert markdown_table(rows) == [
        "| method | params | WER | note |",
        "| --- | --- | --- | --- |",
        "| full | 4,743,240 | 55.44 | - |",
        "| lora | 0 | - | - |",
    ]


def test_named_columns_choose_and_order_the_cells() -> None:
    rows = [{"a": 1, "b": True, "c": None}]
    assert markdown_table(rows, ["c", "b"]) == ["| c | b |", "| --- | --- |", "| - | True |"]


def test_a_table_without_rows_needs_its_columns() -> None:
    assert markdown_table([], ["a"]) == ["| a |", "| --- |"]
    with pytest.raises(ValueError, match="columns named"):
        markdown_table([])
