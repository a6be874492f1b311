"""Target patterns: a dot-boundary suffix of the module name, or a regex matching the whole name."""

from __future__ import annotations

import pytest

from ssvd_peft.targets import closest_names, matches, matches_any

ENC_Q = "encoder.encoders.0.self_attn.linear_q"
DEC_SRC_Q = "decoder.decoders.1.src_attn.linear_q"


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("linear_q", "a.b.linear_q"),
        ("linear_q", "linear_q"),
        ("linear_q", ENC_Q),
        ("self_attn.linear_q", ENC_Q),
        ("encoders.0.self_attn.linear_q", ENC_Q),
        (ENC_Q, ENC_Q),
        ("ctc.ctc_lo", "ctc.ctc_lo"),
    ],
)
def test_a_suffix_on_a_dot_boundary_matches(pattern, name):
    assert matches(pattern, name)


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("linear_q", "a.b.xlinear_q"),
        ("linear_q", "a.b.linear_qv"),
        ("attn.linear_q", ENC_Q),
        ("self_attn.linear_q", DEC_SRC_Q),
        ("encoder", ENC_Q),
        ("linear", ENC_Q),
        ("w_1", "encoder.encoders.0.feed_forward.w_11"),
    ],
)
def test_anything_else_is_not_a_suffix_match(pattern, name):
    assert not matches(pattern, name)


def test_a_regex_must_match_the_whole_name():
    pattern = r"encoder\.encoders\.[0-1]\..*linear_[qv]"
    assert matches(pattern, ENC_Q)
    assert matches(pattern, "encoder.encoders.1.self_attn.linear_v")
    assert not matches(pattern, "encoder.encoders.0.self_attn.linear_k")
    assert not matches(pattern, "encoder.encoders.2.self_attn.linear_q")
    assert not matches(pattern, "x" + ENC_Q)
    assert not matches(pattern, ENC_Q + ".lora")


def test_a_regex_is_not_searched_inside_the_name():
    assert not matches("linear_[qv]", ENC_Q)
    assert matches(r".*linear_[qv]", ENC_Q)
    assert not matches("encoders", ENC_Q)


def test_an_invalid_regex_still_works_as_a_suffix_and_never_raises():
    assert not matches("linear_q[", ENC_Q)
    assert matches("w_1(", "ff.w_1(")


def test_matches_any_is_true_if_one_pattern_matches():
    assert matches_any(["w_1", "linear_q"], ENC_Q)
    assert not matches_any(["w_1", "linear_k"], ENC_Q)
    assert not matches_any([], ENC_Q)


NAMES = [
    "encoder.encoders.0.self_attn.linear_q",
    "encoder.encoders.0.self_attn.linear_k",
    "encoder.encoders.0.feed_forward.w_1",
    "encoder.encoders.0.feed_forward.w_2",
    "decoder.decoders.0.src_attn.linear_q",
    "ctc.ctc_lo",
]


def test_closest_names_suggest_the_leaf_name_for_a_misspelt_suffix():
    assert closest_names("linear_qq", NAMES)[0] == "linear_q"
    assert "ctc_lo" in closest_names("ctc_low", NAMES)
    assert "w_1" in closest_names("w1", NAMES)


def test_closest_names_suggest_full_names_for_a_misspelt_full_name():
    assert "encoder.encoders.0.feed_forward.w_1" in closest_names("encoder.encoders.0.feedforward.w_1", NAMES)


def test_closest_names_are_unique_limited_and_empty_when_nothing_is_alike():
    close = closest_names("linear_x", NAMES, limit=2)
    assert len(close) <= 2
    assert len(set(close)) == len(close)
    assert closest_names("zzzzzz", NAMES) == []
