"""The one scorer of every recipe: word and character error rates after one text normalisation.

    normalize_words("X-ray's 2nd test, 3.5 cm & more!")
        -> "X RAY'S SECOND TEST THREE POINT FIVE CM AND MORE"

Normalisation, in order: curly quotes become straight ones; ``&`` becomes AND; hyphens, slashes and
underscores between words become spaces; numbers are spelled out (integers as cardinals; 1st 2nd
3rd 4th as ordinals; 1,000 as one number; a decimal point as POINT followed by each digit; % as
PERCENT); every character other than a letter, a digit or an apostrophe inside a word is removed;
upper case; single spaces. References and hypotheses go through the same function, so
punctuation, case and number format never count as errors.

WER = (substitutions + deletions + insertions) / reference words, from a word-level Levenshtein
alignment (editdistance, an ESPnet dependency); CER the same over characters (spaces included) of
the normalised texts. A missing hypothesis counts as empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import editdistance

ONES = (
    "ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE", "TEN", "ELEVEN",
    "TWELVE", "THIRTEEN", "FOURTEEN", "FIFTEEN", "SIXTEEN", "SEVENTEEN", "EIGHTEEN", "NINETEEN",
)  # fmt: skip
TENS = ("", "", "TWENTY", "THIRTY", "FORTY", "FIFTY", "SIXTY", "SEVENTY", "EIGHTY", "NINETY")
SCALES = ((10**9, "BILLION"), (10**6, "MILLION"), (1000, "THOUSAND"), (100, "HUNDRED"))
ORDINALS = {
    "ONE": "FIRST", "TWO": "SECOND", "THREE": "THIRD", "FIVE": "FIFTH", "EIGHT": "EIGHTH",
    "NINE": "NINTH", "TWELVE": "TWELFTH",
}  # fmt: skip

THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
NUMBER = re.compile(r"(\d+)(?:\.(\d+)|(st|nd|rd|th)\b)?", re.IGNORECASE)
JOINERS = re.compile(r"(?<=\w)[-/_~]+(?=\w)")
NOT_WORD = re.compile(r"[^A-Z0-9' ]+")
EDGE_APOSTROPHES = re.compile(r"(?<![A-Z0-9])'+|'+(?![A-Z0-9])")


def cardinal(number: int) -> str:
    """English words of a non-negative integer: 1908 -> ONE THOUSAND NINE HUNDRED EIGHT."""
    if number < 20:
        return ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])
    for scale, name in SCALES:
        if number >= scale:
            high, rest = divmod(number, scale)
            return f"{cardinal(high)} {name}" + ("" if rest == 0 else " " + cardinal(rest))
    raise AssertionError(number)


def ordinal(number: int) -> str:
    """FIRST, SECOND, ..., TWENTY FIRST, ONE HUNDREDTH."""
    words = cardinal(number).split()
    last = words[-1]
    if last in ORDINALS:
        words[-1] = ORDINALS[last]
    elif last.endswith("Y"):
        words[-1] = last[:-1] + "IETH"
    else:
        words[-1] = last + "TH"
    return " ".join(words)


def spell_number(match: re.Match[str]) -> str:
    digits, decimals, suffix = match.groups()
    if suffix:
        return f" {ordinal(int(digits))} "
    words = cardinal(int(digits))
    if decimals:
        words += " POINT " + " ".join(ONES[int(d)] for d in decimals)
    return f" {words} "


def normalize_words(text: str) -> str:
    """Upper-case words without punctuation, numbers spelled out (see the module docstring)."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u00a0", " ")
    text = text.replace("&", " and ").replace("%", " percent ")
    text = THOUSANDS_COMMA.sub("", text)
    text = JOINERS.sub(" ", text)
    text = NUMBER.sub(spell_number, text)
    text = NOT_WORD.sub(" ", text.upper())
    text = EDGE_APOSTROPHES.sub(" ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class ErrorRate:
    """Errors over reference length (words or characters)."""

    errors: int
    length: int

    @property
    def percent(self) -> float:
        return 100.0 * self.errors / max(self.length, 1)

    @classmethod
    def summed(cls, rates: Iterable[ErrorRate]) -> ErrorRate:
        """The rate of several utterances together: errors and lengths summed."""
        rates = list(rates)
        return cls(sum(rate.errors for rate in rates), sum(rate.length for rate in rates))


def utterance_errors(
    references: dict[str, str], hypotheses: dict[str, str], utts: list[str] | None = None
) -> list[tuple[ErrorRate, ErrorRate]]:
    """(word errors, character errors) of each utterance of ``utts`` (default: every reference), in
    order, both sides normalised."""
    errors = []
    for utt in references if utts is None else utts:
        reference = normalize_words(references[utt])
        hypothesis = normalize_words(hypotheses.get(utt, ""))
        words = ErrorRate(editdistance.eval(reference.split(), hypothesis.split()), len(reference.split()))
        errors.append((words, ErrorRate(editdistance.eval(reference, hypothesis), len(reference))))
    return errors


def error_rates(
    references: dict[str, str], hypotheses: dict[str, str], utts: list[str] | None = None
) -> tuple[ErrorRate, ErrorRate]:
    """(WER, CER) of ``hypotheses`` on ``utts`` (default: every reference), both sides normalised."""
    per_utterance = utterance_errors(references, hypotheses, utts)
    return (
        ErrorRate.summed(words for words, _ in per_utterance),
        ErrorRate.summed(characters for _, characters in per_utterance),
    )
