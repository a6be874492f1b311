"""Parameter budgets: the closed formulas, the report table and equal budgets across methods."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch

from ssvd_peft.budget import (
    BudgetShortfallWarning,
    block_kind,
    budget_groups,
    equal_budget_configs,
    estimate_budget,
    format_budget_table,
    model_part,
    training_budget,
)
from ssvd_peft.config import PeftConfigError, config_from_dict
from ssvd_peft.inject import inject_adapters, mark_only_adapters_trainable
from ssvd_peft.registry import get_method

TARGETS = ["linear_q", "linear_k", "linear_v", "linear_out", "w_1", "w_2"]
METHODS = {
    "lora": {"rank": 2},
    "dora": {"rank": 2},
    "pissa": {"rank": 2},
    "ssvd": {"k": 4},
    "ssvd_o": {"k": 4, "outer_share": 0.3},
}


@pytest.mark.parametrize("method", METHODS)
def test_estimate_budget_leaves_the_model_alone_and_equals_the_injection_report(method, tiny_asr):
    config = config_from_dict(method, {"target_modules": [*TARGETS, "ctc_lo"], **METHODS[method]})
    state = {key: value.clone() for key, value in tiny_asr.state_dict().items()}
    types = [type(module) for module in tiny_asr.modules()]
    estimate = estimate_budget(tiny_asr, config)
    assert [type(module) for module in tiny_asr.modules()] == types
    for key, value in tiny_asr.state_dict().items():
        assert torch.equal(value, state[key])
    assert estimate == estimate_budget(
        tiny_asr, method, target_modules=[*TARGETS, "ctc_lo"], **METHODS[method]
    )
    assert estimate == inject_adapters(tiny_asr, config)


def test_estimate_budget_refuses_what_injection_refuses(tiny_asr):
    with pytest.raises(PeftConfigError, match=r"'ctc\.ctc_lo'"):
        estimate_budget(tiny_asr, "lora", target_modules=["w_1", "ctc_lo"], rank=12)
    with pytest.raises(PeftConfigError, match="linear_qq"):
        estimate_budget(tiny_asr, "ssvd", target_modules=["linear_qq"])


# Hand-computed totals on the tiny model for target_modules [w_1, w_2, ctc_lo]:
# four w_1 (16 -> 24), four w_2 (24 -> 16), one ctc_lo (16 -> 10).
FF_AND_CTC = ["w_1", "w_2", "ctc_lo"]
CLOSED_FORMS = {
    # r (in + out): 8 * 2 * (16 + 24) + 2 * (16 + 10)
    "lora r=2": ("lora", {"rank": 2}, dict(inner=352, outer=340, values=0, total=692)),
    # same as LoRA; rsLoRA changes the scale, not the count
    "pissa r=2": ("pissa", {"rank": 2, "use_rslora": True}, dict(inner=352, outer=340, values=0, total=692)),
    # LoRA + out magnitudes: 692 + 4 * 24 + 4 * 16 + 10
    "dora r=2": ("dora", {"rank": 2}, dict(inner=352, outer=510, values=0, total=862)),
    # k + k_in (k_in - 1) / 2 with k_in = k = 4: 9 * (4 + 6)
    "ssvd k=4": ("ssvd", {"k": 4}, dict(inner=54, outer=0, values=36, total=90)),
    # k_in = 2: 9 * (4 + 1)
    "ssvd k=4 k_in=2": ("ssvd", {"k": 4, "k_in": 2}, dict(inner=9, outer=0, values=36, total=45)),
    # k = round(0.5 m): 8 layers with m = 16 -> k = 8: 8 + 28; ctc_lo m = 10 -> k = 5: 5 + 10
    "ssvd k_ratio=0.5": ("ssvd", {"k_ratio": 0.5}, dict(inner=234, outer=0, values=69, total=303)),
    # +1 gate per layer; the smaller side rotates: w_1 (out > in) inner, w_2 and ctc_lo (out < in) outer
    "ssvd espnet_compat": (
        "ssvd",
        {"k": 4, "espnet_compat": True},
        dict(inner=24, outer=30, values=45, total=99),
    ),
    # k + k_in (k_in - 1) / 2 + k_out (k_out - 1) / 2: 9 * (4 + 3 + 1)
    "ssvd_o k_in=3 k_out=2": (
        "ssvd_o",
        {"k": 4, "k_in": 3, "k_out": 2},
        dict(inner=27, outer=9, values=36, total=72),
    ),
    # rotation budget k (k - 1) / 2 = 6 split 3 / 3: k_in = k_out = 3 (3 parameters each)
    "ssvd_o share 0.5": (
        "ssvd_o",
        {"k": 4, "outer_share": 0.5},
        dict(inner=27, outer=27, values=36, total=90),
    ),
    # rho = 0 is SSVD
    "ssvd_o share 0": ("ssvd_o", {"k": 4, "outer_share": 0.0}, dict(inner=54, outer=0, values=36, total=90)),
    # rho = 1: all rotation on the output side
    "ssvd_o share 1": ("ssvd_o", {"k": 4, "outer_share": 1.0}, dict(inner=0, outer=54, values=36, total=90)),
    # budget 10 at rho 0.3: inner 7 -> k_in = 4 (6), outer 3 -> k_out = 3 (3)
    "ssvd_o budget=10": (
        "ssvd_o",
        {"k": 4, "outer_share": 0.3, "rotation_budget": 10},
        dict(inner=54, outer=27, values=36, total=117),
    ),
}


@pytest.mark.parametrize("case", CLOSED_FORMS)
def test_counts_follow_the_closed_formulas(case, tiny_asr):
    method, options, expected = CLOSED_FORMS[case]
    report = estimate_budget(tiny_asr, method, target_modules=FF_AND_CTC, **options)
    assert len(report.modules) == 9
    splits = [module.split for module in report.modules]
    measured = {
        "inner": sum(s.inner for s in splits),
        "outer": sum(s.outer for s in splits),
        "values": sum(s.values for s in splits),
        "total": report.trainable,
    }
    assert measured == expected


@pytest.mark.parametrize("method", METHODS)
def test_subspace_split_sums_to_the_total_per_module_and_per_group(method, tiny_asr):
    report = estimate_budget(tiny_asr, method, target_modules=[*TARGETS, "ctc_lo"], **METHODS[method])
    for module in report.modules:
        assert module.split.inner + module.split.outer + module.split.values == module.trainable > 0
    groups = budget_groups(report)
    for group in groups.values():
        assert group["inner"] + group["outer"] + group["values"] == group["total"]
    assert sum(group["total"] for group in groups.values()) == report.trainable
    assert sum(group["modules"] for group in groups.values()) == len(report.modules)


@pytest.mark.parametrize(
    ("name", "part", "block"),
    [
        ("encoder.encoders.0.self_attn.linear_q", "encoder", "attention"),
        ("encoder.encoders.0.feed_forward.w_1", "encoder", "feed_forward"),
        ("decoder.decoders.1.src_attn.linear_out", "decoder", "attention"),
        ("decoder.decoders.1.feed_forward.w_2", "decoder", "feed_forward"),
        ("ctc.ctc_lo", "other", "other"),
    ],
)
def test_modules_are_grouped_by_model_part_and_block(name, part, block):
    assert (model_part(name), block_kind(name)) == (part, block)


def test_budget_report_as_data_has_modules_groups_and_totals(tiny_asr):
    report = estimate_budget(tiny_asr, "lora", target_modules=[*TARGETS, "ctc_lo"], rank=2)
    data = report.to_dict()
    assert (data["adapter_name"], data["method"]) == ("default", "lora")
    modules = {m["name"]: m for m in data["modules"]}
    for module in report.modules:
        row = modules[module.name]
        assert (row["in_features"], row["out_features"]) == (module.in_features, module.out_features)
        assert (row["inner"], row["outer"], row["values"], row["total"]) == (
            2 * module.in_features, 2 * module.out_features, 0, module.trainable,
        )  # fmt: skip
    groups = {(g["part"], g["block"]): g for g in data["groups"]}
    # 2 layers x 4 attention Linears (16 -> 16): 2 * 32 each; 2 x (w_1 + w_2): 2 * 40 each
    assert {key: g["modules"] for key, g in groups.items()} == {
        ("decoder", "attention"): 16,
        ("decoder", "feed_forward"): 4,
        ("encoder", "attention"): 8,
        ("encoder", "feed_forward"): 4,
        ("other", "other"): 1,
    }
    assert groups[("encoder", "attention")]["total"] == 8 * 2 * 32
    # 24 attention Linears * 2 (16 + 16) + 8 feed-forward Linears * 2 (16 + 24) + ctc_lo 2 (16 + 10)
    assert data["trainable"] == sum(g["total"] for g in groups.values()) == 24 * 64 + 8 * 80 + 52
    assert data["model_parameters"] == sum(p.numel() for p in tiny_asr.parameters())
    json.dumps(data)  # plain data


def test_the_budget_table_names_every_module_and_the_totals(tiny_asr):
    report = estimate_budget(tiny_asr, "lora", target_modules=[*TARGETS, "ctc_lo"], rank=2)
    table = str(report)
    assert all(module.name in table for module in report.modules)
    assert "[encoder / attention] 8 modules" in table
    assert f"trainable {report.trainable:,} of {report.model_parameters:,}" in table


def test_the_training_budget_adds_the_model_part_and_modules_to_save(tiny_asr):
    inject_adapters(tiny_asr, "lora", target_modules=TARGETS, rank=2)
    mark_only_adapters_trainable(tiny_asr, modules_to_save=["ctc.ctc_lo"])
    budget = training_budget(tiny_asr, modules_to_save=["ctc.ctc_lo"])
    data = budget.to_dict()
    assert data["modules_to_save"] == {"patterns": ["ctc.ctc_lo"], "parameters": 16 * 10 + 10}
    assert data["model_part"] == 0
    assert data["trainable"] == data["adapter"]["trainable"] + 170
    assert data["trainable"] == sum(p.numel() for p in tiny_asr.parameters() if p.requires_grad)
    planned = estimate_budget(copy.deepcopy(tiny_asr), "lora", target_modules=TARGETS, rank=2).to_dict()
    assert data["adapter"] == planned, "the injected model reports what the plan said"
    assert "modules_to_save ['ctc.ctc_lo']: 170 parameters" in str(budget)


def test_budget_table_without_module_rows_keeps_groups_and_total(tiny_asr):
    report = estimate_budget(tiny_asr, "ssvd_o", target_modules=TARGETS, k=4)
    table = format_budget_table(report, per_module=False)
    assert "linear_q" not in table
    assert "[decoder / attention] 16 modules" in table
    assert "total: 32 modules" in table


BUDGET_TARGETS = ["linear_q", "linear_v", "w_1", "w_2"]
KNOBS = {method: get_method(method).knob for method in ("lora", "dora", "pissa", "ssvd", "ssvd_o")}
LARGEST_KNOB = 16  # every targeted layer has min(in, out) = 16


def total_for(model, config, value: int) -> int:
    knob = KNOBS[config.method]
    return estimate_budget(model, dataclasses.replace(config, **{knob: value})).trainable


@pytest.mark.parametrize("budget", [300, 800, 1300, 1500, 4000])
def test_equal_budget_configs_pick_the_closest_total_within_one_knob_step(budget, tiny_asr):
    methods = {
        "lora": {"target_modules": BUDGET_TARGETS, "alpha": 32.0},
        "dora": {"target_modules": BUDGET_TARGETS},
        "pissa": {"target_modules": BUDGET_TARGETS},
        "ssvd": {"target_modules": BUDGET_TARGETS},
        "ssvd_o": {"target_modules": BUDGET_TARGETS, "outer_share": 0.3},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetShortfallWarning)
        matches = equal_budget_configs(tiny_asr, budget, methods)
    assert list(matches) == list(methods)
    for method, match in matches.items():
        config = match.config
        assert (match.knob, match.value) == (KNOBS[method], getattr(config, KNOBS[method]))
        assert match.trainable == total_for(tiny_asr, config, match.value)
        for option, value in methods[method].items():
            assert getattr(config, option) == value
        value = getattr(config, KNOBS[method])
        totals = {v: total_for(tiny_asr, config, v) for v in range(1, LARGEST_KNOB + 1)}
        distance = abs(totals[value] - budget)
        assert distance == min(abs(total - budget) for total in totals.values()), method
        if budget < totals[1]:
            assert value == 1, method
        elif budget > totals[LARGEST_KNOB]:
            assert value == LARGEST_KNOB, method
        else:
            if value + 1 in totals:
                assert distance <= totals[value + 1] - totals[value], method
            if value - 1 in totals:
                assert distance <= totals[value] - totals[value - 1], method


def test_the_budgets_above_span_below_inside_and_beyond_the_methods_ranges(tiny_asr):
    # 20 layers: encoder 2 x (linear_q, linear_v, w_1, w_2), decoder 2 x (2 x (linear_q, linear_v), w_1, w_2)
    # LoRA: r (2 * (2 * 32 + 80) + 2 * (4 * 32 + 80)) = 704 r; DoRA adds the 352 output rows;
    # SSVD at k = 16: 20 (16 + 120)
    lora = estimate_budget(tiny_asr, "lora", target_modules=BUDGET_TARGETS, rank=1).trainable
    dora = estimate_budget(tiny_asr, "dora", target_modules=BUDGET_TARGETS, rank=1).trainable
    ssvd = estimate_budget(tiny_asr, "ssvd", target_modules=BUDGET_TARGETS, k=LARGEST_KNOB).trainable
    assert (lora, dora, ssvd) == (704, 1056, 2720)


def test_a_budget_out_of_reach_is_warned_with_its_shortfall_and_refused_when_strict(tiny_asr):
    """LoRA tops out at rank 16 (704 x 16 = 11,264) on these layers: 60,000 cannot be reached."""
    methods = {"lora": {"target_modules": BUDGET_TARGETS}, "ssvd": {"target_modules": BUDGET_TARGETS}}
    with pytest.warns(BudgetShortfallWarning) as caught:
        matches = equal_budget_configs(tiny_asr, 60_000, methods)
    lora = matches["lora"]
    assert (lora.value, lora.trainable, lora.step) == (16, 11_264, 704)
    assert lora.shortfall == 60_000 - 11_264 and not lora.reached
    messages = [str(w.message) for w in caught]
    assert any(
        "lora: the budget of 60,000" in m and "rank = 16, trains 11,264 (48,736 below it" in m
        for m in messages
    )
    assert any(m.startswith("ssvd: ") for m in messages)
    with pytest.raises(
        PeftConfigError, match="lora: the budget of 60,000 trainable parameters is out of reach"
    ):
        equal_budget_configs(tiny_asr, 60_000, methods, strict=True)


def test_a_budget_below_the_smallest_step_is_out_of_reach_too(tiny_asr):
    """DoRA's magnitudes alone are 352 parameters; rank 1 trains 1,056, two ranks' steps above 100."""
    with pytest.warns(BudgetShortfallWarning, match="dora: the budget of 100 .* above it"):
        match = equal_budget_configs(tiny_asr, 100, {"dora": {"target_modules": BUDGET_TARGETS}})["dora"]
    assert (match.value, match.trainable, match.step) == (1, 1056, 704)


def test_budgets_inside_the_range_are_reached_without_a_warning(tiny_asr):
    methods = {m: {"target_modules": BUDGET_TARGETS} for m in KNOBS}
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetShortfallWarning)
        matches = equal_budget_configs(tiny_asr, 2000, methods, strict=True)
    assert all(match.reached for match in matches.values())


def test_equal_budget_configs_refuse_an_unknown_method(tiny_asr):
    with pytest.raises(PeftConfigError, match="Did you mean 'lora'"):
        equal_budget_configs(tiny_asr, 1000, {"lroa": {"target_modules": BUDGET_TARGETS}})
