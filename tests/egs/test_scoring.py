"""The recipes' one scorer (egs/common/pyscripts/scoring.py): one normalisation, WER and CER."""

from __future__ import annotations

import pytest
from kaldi_files import read_table, write_table
from scoring import ErrorRate, error_rates, normalize_words


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("X-ray's 2nd test, 3.5 cm & more!", "X RAY'S SECOND TEST THREE POINT FIVE CM AND MORE"),
        ("It costs 1,908 dollars (50%)", "IT COSTS ONE THOUSAND NINE HUNDRED EIGHT DOLLARS FIFTY PERCENT"),
        ("\u2018quoted\u2019 'words' don't", "QUOTED WORDS DON'T"),
        ("  the   cat  ", "THE CAT"),
    ],
)
def test_one_normalisation_for_references_and_hypotheses(text, normalised):
    assert normalize_words(text) == normalised


def test_word_errors_count_substitutions_deletions_and_insertions():
    assert error_rates({"u": "a b c d"}, {"u": "a x c"})[0] == ErrorRate(2, 4)
    assert error_rates({"u": ""}, {"u": "a b"})[0] == ErrorRate(2, 0)
    assert error_rates({"u": "a b"}, {"u": "A, b!"})[0] == ErrorRate(0, 2), "case and punctuation are free"


def test_error_rates_run_over_the_given_utterances_and_count_missing_hypotheses_as_empty():
    references = {"u1": "the cat sat", "u2": "on the mat"}
    wer, cer = error_rates(references, {"u1": "the cat sat"})
    assert wer == ErrorRate(3, 6) and cer == ErrorRate(
        len("ON THE MAT"), len("THE CAT SAT") + len("ON THE MAT")
    )
    assert error_rates(references, {}, ["u1"])[0] == ErrorRate(3, 3)


def test_kaldi_tables_read_as_espnet_reads_them_and_write_sorted(tmp_path):
    write_table(tmp_path / "text", {"utt2": "b c", "utt1": "a", "utt3": ""})
    assert (tmp_path / "text").read_text() == "utt1 a\nutt2 b c\nutt3\n"
    assert read_table(tmp_path / "text") == {"utt1": "a", "utt2": "b c", "utt3": ""}
