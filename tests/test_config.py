"""Configurations: built from a YAML block, every mistake refused with a message that names it."""

from __future__ import annotations

import pytest
import yaml
from torch import nn

from ssvd_peft.config import PeftConfigError, config_from_dict
from ssvd_peft.methods.dora import DoraConfig
from ssvd_peft.methods.lora import LoraConfig
from ssvd_peft.methods.pissa import PissaConfig
from ssvd_peft.methods.ssvd import SsvdConfig, SsvdOConfig
from ssvd_peft.registry import get_method, method_names

METHOD_BLOCKS = {
    "lora": ("rank: 4\nalpha: 8.0\ndropout: 0.1\nuse_rslora: true", LoraConfig),
    "dora": ("rank: 4\nalpha: 8.0", DoraConfig),
    "pissa": ("rank: 4\nsvd_method: randomized\nsvd_niter: 2", PissaConfig),
    "ssvd": ("k_ratio: 0.25\nk_in: 3\nrotation: neumann\nneumann_terms: 6", SsvdConfig),
    "ssvd_o": ("k: 8\nouter_share: 0.3\nrotation_budget: 20\nrotation: expm", SsvdOConfig),
}


@pytest.mark.parametrize("method", METHOD_BLOCKS)
def test_every_method_builds_from_a_yaml_block(method):
    block, config_class = METHOD_BLOCKS[method]
    options = yaml.safe_load(f"target_modules: [linear_q, w_1]\n{block}")
    config = config_from_dict(method, options)
    assert type(config) is config_class
    assert config.method == method
    assert config.target_modules == ["linear_q", "w_1"]
    for name, value in options.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize("method", METHOD_BLOCKS)
def test_to_dict_rebuilds_the_same_config(method):
    block, _ = METHOD_BLOCKS[method]
    config = config_from_dict(method, yaml.safe_load(f"target_modules: [linear_q]\n{block}"))
    assert config_from_dict(method, config.to_dict()) == config


def test_the_method_table_maps_each_method_to_its_config_class():
    for method, (_, config_class) in METHOD_BLOCKS.items():
        assert get_method(method).config is config_class


def test_a_single_target_string_becomes_a_list():
    config = config_from_dict("lora", {"target_modules": "linear_q", "exclude_modules": "decoder"})
    assert config.target_modules == ["linear_q"]
    assert config.exclude_modules == ["decoder"]


def test_empty_target_modules_is_refused():
    with pytest.raises(PeftConfigError, match="target_modules"):
        config_from_dict("ssvd", {"target_modules": []})


def test_an_empty_yaml_block_asks_for_target_modules_and_a_list_is_refused():
    with pytest.raises(PeftConfigError, match="target_modules is empty"):
        config_from_dict("lora", yaml.safe_load("peft_conf:")["peft_conf"])
    with pytest.raises(PeftConfigError, match="options must be a mapping"):
        config_from_dict("lora", ["linear_q"])


def test_rslora_scaling_uses_the_square_root_of_the_rank():
    layer = nn.Linear(8, 8)
    plain = config_from_dict("lora", {"target_modules": ["q"], "rank": 4, "alpha": 8.0})
    assert plain.build(layer).scaling == 2.0
    rs = config_from_dict("lora", {"target_modules": ["q"], "rank": 4, "alpha": 8.0, "use_rslora": True})
    assert rs.build(layer).scaling == 4.0


def test_unknown_method_is_refused_with_a_close_match_and_the_choices():
    with pytest.raises(PeftConfigError) as error:
        config_from_dict("ssvdo", {"target_modules": ["linear_q"]})
    message = str(error.value)
    assert "'ssvdo'" in message
    assert "Did you mean 'ssvd_o'" in message
    for method in method_names():
        assert method in message


def test_unknown_option_is_refused_with_a_close_match_and_the_valid_options():
    with pytest.raises(PeftConfigError) as error:
        config_from_dict("lora", {"target_modules": ["linear_q"], "rnak": 4})
    message = str(error.value)
    assert "'rnak'" in message
    assert "Did you mean 'rank'" in message
    for option in ("target_modules", "rank", "alpha", "dropout", "use_rslora"):
        assert option in message


def test_an_option_of_another_method_is_unknown():
    with pytest.raises(PeftConfigError, match=r"unknown option 'outer_share'"):
        config_from_dict("ssvd", {"target_modules": ["linear_q"], "outer_share": 0.5})


BAD_VALUES = [
    ("lora", "rank", 0),
    ("lora", "rank", 2.5),
    ("lora", "rank", True),
    ("lora", "alpha", 0.0),
    ("lora", "dropout", 1.0),
    ("lora", "dropout", -0.1),
    ("dora", "rank", -1),
    ("pissa", "svd_method", "qr"),
    ("pissa", "svd_niter", 0),
    ("ssvd", "k", 0),
    ("ssvd", "k_ratio", 0.0),
    ("ssvd", "k_ratio", 1.5),
    ("ssvd", "k_in", 0),
    ("ssvd", "rotation", "givens"),
    ("ssvd", "neumann_terms", 0),
    ("ssvd_o", "outer_share", 1.5),
    ("ssvd_o", "outer_share", -0.1),
    ("ssvd_o", "k_out", 0),
    ("ssvd_o", "rotation_budget", -1),
    ("ssvd_o", "rotation", "bad"),
    ("ssvd_o", "espnet_compat", True),
]


@pytest.mark.parametrize(("method", "option", "value"), BAD_VALUES)
def test_out_of_range_values_are_refused_naming_the_option(method, option, value):
    with pytest.raises(PeftConfigError) as error:
        config_from_dict(method, {"target_modules": ["linear_q"], option: value})
    message = str(error.value)
    assert option in message
    assert message.startswith(method)


def test_espnet_compat_on_ssvd_o_points_to_ssvd():
    with pytest.raises(PeftConfigError, match="use method 'ssvd' with espnet_compat"):
        config_from_dict("ssvd_o", {"target_modules": ["linear_q"], "espnet_compat": True})


def test_boundary_values_are_accepted():
    config_from_dict("lora", {"target_modules": ["q"], "rank": 1, "dropout": 0.0})
    config_from_dict("ssvd", {"target_modules": ["q"], "k_ratio": 1.0})
    config_from_dict("ssvd_o", {"target_modules": ["q"], "outer_share": 0.0, "rotation_budget": 0})
    config_from_dict("ssvd_o", {"target_modules": ["q"], "outer_share": 1.0})


ENC0_Q = "encoder.encoders.0.self_attn.linear_q"
ENC1_Q = "encoder.encoders.1.self_attn.linear_q"
DEC0_W1 = "decoder.decoders.0.feed_forward.w_1"


def test_module_overrides_apply_per_module_and_later_patterns_win():
    config = config_from_dict(
        "lora",
        {
            "target_modules": ["linear_q", "w_1"],
            "rank": 8,
            "module_overrides": {
                "linear_q": {"rank": 4, "alpha": 4.0},
                r"encoder\.encoders\.0\..*": {"rank": 2},
            },
        },
    )
    enc0 = config.for_module(ENC0_Q)
    assert (enc0.rank, enc0.alpha) == (2, 4.0)
    enc1 = config.for_module(ENC1_Q)
    assert (enc1.rank, enc1.alpha) == (4, 4.0)
    assert config.for_module(DEC0_W1) is config
    assert (config.rank, config.alpha) == (8, 16.0)


def test_module_overrides_keep_the_shared_options():
    config = config_from_dict(
        "ssvd_o",
        {
            "target_modules": ["w_1"],
            "exclude_modules": ["decoder"],
            "init_weights": False,
            "k": 6,
            "module_overrides": {"w_1": {"k": 3, "outer_share": 1.0}},
        },
    )
    changed = config.for_module(DEC0_W1)
    assert type(changed) is SsvdOConfig
    assert (changed.k, changed.outer_share) == (3, 1.0)
    assert (changed.target_modules, changed.exclude_modules, changed.init_weights) == (
        ["w_1"],
        ["decoder"],
        False,
    )


def test_unknown_option_inside_module_overrides_is_refused_with_a_hint():
    with pytest.raises(PeftConfigError) as error:
        config_from_dict("ssvd", {"target_modules": ["w_1"], "module_overrides": {"w_1": {"k_rato": 0.2}}})
    message = str(error.value)
    assert "module_overrides" in message
    assert "'k_rato'" in message
    assert "Did you mean 'k_ratio'" in message


def test_where_options_cannot_be_overridden_per_module():
    with pytest.raises(PeftConfigError, match="target_modules"):
        config_from_dict(
            "lora", {"target_modules": ["w_1"], "module_overrides": {"w_1": {"target_modules": ["w_2"]}}}
        )


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("lora", "rank", 0),
        ("lora", "dropout", 1.0),
        ("ssvd", "rotation", "givens"),
        ("ssvd_o", "outer_share", 2.0),
    ],
)
def test_bad_value_inside_module_overrides_is_refused_naming_the_pattern_and_option(method, option, value):
    with pytest.raises(PeftConfigError) as error:
        config_from_dict(method, {"target_modules": ["w_1"], "module_overrides": {"w_1": {option: value}}})
    message = str(error.value)
    assert "module_overrides['w_1']" in message
    assert option in message


def test_module_overrides_must_be_mappings():
    with pytest.raises(PeftConfigError, match=r"module_overrides\['w_1'\] must be a mapping"):
        config_from_dict("lora", {"target_modules": ["w_1"], "module_overrides": {"w_1": 4}})
    with pytest.raises(PeftConfigError, match="module_overrides must be a mapping"):
        config_from_dict("lora", {"target_modules": ["w_1"], "module_overrides": [{"w_1": {"rank": 2}}]})
