"""FusionConfig: taps and groups resolved against an encoder, one clear message for each bad value."""

from __future__ import annotations

import pytest

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion import FusionConfig, resolve_taps


def test_all_taps_are_the_embedding_output_and_every_block() -> None:
    assert FusionConfig().resolve_taps(4) == [0, 1, 2, 3, 4]


def test_taps_are_returned_sorted() -> None:
    assert FusionConfig(taps=[4, 0, 2]).resolve_taps(4) == [0, 2, 4]


@pytest.mark.parametrize("tap", [5, -1])
def test_a_tap_out_of_range_names_the_valid_range(tap: int) -> None:
    with pytest.raises(PeftConfigError, match=rf"tap {tap} is out of range; .* 4 blocks.* 0 .*\.\. 4"):
        FusionConfig(taps=[0, tap]).resolve_taps(4)


def test_a_repeated_tap_is_refused() -> None:
    with pytest.raises(PeftConfigError, match=r"name \[2\] more than once"):
        resolve_taps([0, 2, 2], 4)


@pytest.mark.parametrize("taps", [[], "some", [1.0]])
def test_taps_must_be_block_indices(taps) -> None:
    with pytest.raises(PeftConfigError, match="taps"):
        FusionConfig(taps=taps).resolve_taps(4)


def test_a_number_of_groups_cuts_the_taps_into_contiguous_near_equal_groups() -> None:
    assert FusionConfig(groups=3).resolve_groups([0, 1, 2, 3, 4]) == [[0, 1], [2, 3], [4]]
    assert FusionConfig(groups=1).resolve_groups([0, 6]) == [[0, 6]]


def test_explicit_groups_are_kept() -> None:
    assert FusionConfig(groups=[[0], [2, 4]]).resolve_groups([0, 2, 4]) == [[0], [2, 4]]


@pytest.mark.parametrize(
    "groups",
    [[[0], [4]], [[0, 4], [2]], [[0, 2], [2, 4]], [[0, 2, 4], []], [[0, 2], [4, 6]]],
    ids=["gap", "out_of_order", "overlap", "empty_group", "foreign_tap"],
)
def test_groups_that_do_not_cover_the_taps_in_order_are_refused(groups) -> None:
    with pytest.raises(PeftConfigError, match=r"do not cover the taps \[0, 2, 4\] contiguously and in order"):
        FusionConfig(groups=groups).resolve_groups([0, 2, 4])


def test_more_groups_than_taps_are_refused() -> None:
    with pytest.raises(PeftConfigError, match="groups = 4 but there are only 3 taps"):
        FusionConfig(groups=4).resolve_groups([0, 2, 4])


def test_an_unknown_variant_gets_the_nearest_name_and_the_known_ones() -> None:
    with pytest.raises(
        PeftConfigError, match=r"unknown fusion variant 'lader'.*ladder.*Did you mean 'ladder'"
    ):
        FusionConfig(variant="lader")


def test_an_unknown_key_gets_the_nearest_one() -> None:
    with pytest.raises(PeftConfigError, match=r"unknown option 'varaint'\. Did you mean 'variant'\?"):
        FusionConfig.from_dict({"varaint": "ladder"})


def test_from_dict_round_trips() -> None:
    config = FusionConfig.from_dict(
        {"taps": [0, 3], "variant": "grouped", "groups": [[0], [3]], "out_dim": 8}
    )
    assert FusionConfig.from_dict(config.to_dict()) == config


def test_a_cache_needs_a_disk_budget() -> None:
    with pytest.raises(PeftConfigError, match="cache_max_gb is not set"):
        FusionConfig(cache_dir="taps")
    assert FusionConfig(cache_dir="taps", cache_max_gb=0.5).cache_max_bytes == 512 * 1024**2


@pytest.mark.parametrize(
    ("option", "value"),
    [("reduction", 0), ("attention_heads", 1.5), ("out_dim", -3), ("dropout", 1.0), ("kernel_size", 5)],
)
def test_bad_knob_values_are_refused(option: str, value) -> None:
    with pytest.raises(PeftConfigError, match=option):
        FusionConfig(**{option: value})
