"""Merging adapters of every method through their dense updates: the merge folded into the base,
kept as a LoRA (with its reconstruction error) or, for the SSVD family, as a subspace core; and
one clear error per bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_cases import METHODS, SSVD_FAMILY, TARGETS, TinyNet, applied, train_adapter

from ssvd_peft.checkpoint import load_adapter
from ssvd_peft.errors import PeftConfigError
from ssvd_peft.inject import iter_adapter_layers, merge_and_unload
from ssvd_peft.merging.adapters import AdapterMerge


def assert_states_close(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tolerance, msg=key)


@pytest.mark.parametrize("case", [case for case in METHODS if case != "hdmole"])
def test_one_adapter_with_task_arithmetic_at_one_folds_to_that_adapter(case, tmp_path):
    path = train_adapter(case, 1, tmp_path / "a.safetensors", save_ctc=True)
    merged = AdapterMerge(TinyNet().state_dict(), [path], "task_arithmetic").state_dict()
    assert_states_close(merged, applied(path), atol=1e-5, rtol=1e-5)


def test_hdmole_contributes_one_task_per_domain(tmp_path):
    path = train_adapter("hdmole", 1, tmp_path / "h.safetensors")
    model = TinyNet()
    load_adapter(model, path)
    merge = AdapterMerge(TinyNet().state_dict(), [path], "task_arithmetic", weights=[0.25, 0.75])
    merged = merge.state_dict()
    for name, layer in iter_adapter_layers(model):
        adapter = layer.peft_adapters["default"]
        expected = (
            layer.base_layer.weight
            + 0.25 * adapter.domain_delta_weight(0)
            + 0.75 * adapter.domain_delta_weight(1)
        )
        torch.testing.assert_close(merged[f"{name}.weight"], expected.detach(), atol=1e-6, rtol=1e-6)
    with pytest.raises(PeftConfigError, match=r"3 weights for 1 adapters \(2 tasks"):
        AdapterMerge(TinyNet().state_dict(), [path], "task_arithmetic", weights=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("case", ["lora", "dora", "pissa", "hdmole"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv_m", "boosted_tsv_m", "knots"])
def test_a_merged_lora_of_full_rank_folds_to_the_merged_dense_update(case, method, tmp_path):
    paths = [train_adapter(case, seed, tmp_path / f"{seed}.safetensors", save_ctc=True) for seed in (1, 2)]
    merge = AdapterMerge(TinyNet().state_dict(), paths, method, scaling=0.7)
    kept = merge.adapter(form="lora", rank=12)
    assert kept.error < 1e-6
    path = kept.save(tmp_path / "merged.safetensors")
    assert_states_close(applied(path), merge.state_dict(), atol=1e-5, rtol=1e-5)


def test_a_truncated_lora_reports_the_update_it_loses(tmp_path):
    paths = [train_adapter("lora", seed, tmp_path / f"{seed}.safetensors") for seed in (1, 2, 3)]
    merge = AdapterMerge(TinyNet().state_dict(), paths, "task_arithmetic")
    full = merge.state_dict()
    kept = merge.adapter(form="lora")  # default rank: one input adapter's, 2
    assert kept.file.config["rank"] == 2
    folded = applied(kept.save(tmp_path / "merged.safetensors"))
    base = TinyNet().state_dict()
    lost = total = 0.0
    for layer in TARGETS:
        key = f"{layer}.weight"
        update, approximation = full[key] - base[key], folded[key] - base[key]
        error = float((update - approximation).norm() / update.norm())
        assert kept.errors[layer] == pytest.approx(error, rel=1e-4)
        assert 0.05 < error < 1.0, "three rank-2 updates do not fit in rank 2"
        lost, total = lost + float((update - approximation).norm()) ** 2, total + float(update.norm()) ** 2
    assert kept.error == pytest.approx((lost / total) ** 0.5, rel=1e-4)
    assert "reconstruction error" in kept.summary()


@pytest.mark.parametrize("case", SSVD_FAMILY)
@pytest.mark.parametrize("method", ["task_arithmetic", "tsv_m", "iso_c"])
def test_the_subspace_core_merge_equals_the_dense_merge(case, method, tmp_path):
    """TA and the SVD-based merges commute with U_k . V_k^T: the k x k core merge keeps a subspace
    adapter of the same k whose update is the dense merge's."""
    paths = [train_adapter(case, seed, tmp_path / f"{seed}.safetensors") for seed in (1, 2)]
    merge = AdapterMerge(TinyNet().state_dict(), paths, method, scaling=0.8)
    kept = merge.adapter()
    assert kept.file.method == "ssvd_core"
    path = kept.save(tmp_path / "merged.safetensors")
    model = TinyNet()
    load_adapter(model, path)
    assert [layer.peft_adapters["default"].k for _, layer in iter_adapter_layers(model)] == [6, 6, 6]
    assert_states_close(merge_and_unload(model).state_dict(), merge.state_dict(), atol=1e-5, rtol=1e-5)


def test_ssvd_and_ssvd_o_adapters_merge_in_one_subspace(tmp_path):
    paths = [
        train_adapter("ssvd", 1, tmp_path / "s.safetensors"),
        train_adapter("ssvd_o", 2, tmp_path / "o.safetensors"),
    ]
    merge = AdapterMerge(TinyNet().state_dict(), paths, "task_arithmetic", weights=[0.5, 0.5])
    assert_states_close(
        applied(merge.adapter().save(tmp_path / "m.safetensors")), merge.state_dict(), atol=1e-5, rtol=1e-5
    )


def test_subspace_merges_of_low_rank_updates_stay_in_their_span(tmp_path):
    """A rank-2 update has r = 2: Iso-C flattens two singular values, not min(out, in)."""
    paths = [train_adapter("lora", seed, tmp_path / f"{seed}.safetensors") for seed in (1, 2)]
    base = TinyNet().state_dict()
    for method in ("iso_c", "iso_cts", "tsv_m"):
        merged = AdapterMerge(base, paths, method).state_dict()
        update = (merged["proj_in.weight"] - base["proj_in.weight"]).double()
        values = torch.linalg.svdvals(update)
        assert int((values > 1e-5 * values[0]).sum()) <= 4, method


def test_layers_only_some_adapters_adapt_merge_with_a_zero_update(tmp_path):
    first = train_adapter("lora", 1, tmp_path / "1.safetensors", targets=["proj_in"])
    second = train_adapter("lora", 2, tmp_path / "2.safetensors", targets=["proj_in", "head"])
    merged = AdapterMerge(
        TinyNet().state_dict(), [first, second], "task_arithmetic", weights=[0.5, 0.5]
    ).state_dict()
    only_second = applied(second)
    base = TinyNet().state_dict()
    torch.testing.assert_close(
        merged["head.weight"], base["head.weight"] + 0.5 * (only_second["head.weight"] - base["head.weight"])
    )
    with pytest.raises(PeftConfigError, match=r"adapt proj_in with one subspace size k"):
        AdapterMerge(
            TinyNet().state_dict(),
            [
                train_adapter("ssvd", 1, tmp_path / "s1.safetensors", targets=["proj_in"]),
                train_adapter("ssvd", 2, tmp_path / "s2.safetensors", targets=["proj_in"], k_ratio=0.25),
            ],
            "task_arithmetic",
        ).adapter()


def test_every_parameter_space_method_merges_adapters(tmp_path):
    paths = [train_adapter("dora", seed, tmp_path / f"{seed}.safetensors") for seed in (1, 2)]
    base = TinyNet().state_dict()
    for method in ("soup", "model_stock", "karcher", "multislerp", "pcb", "sce", "iso_cts"):
        merged = AdapterMerge(base, paths, method).state_dict()
        assert not torch.equal(merged["proj_in.weight"], base["proj_in.weight"]), method
        torch.testing.assert_close(merged["proj_in.bias"], base["proj_in.bias"])


def test_bad_adapter_merges_get_one_message_each(tmp_path):
    lora = train_adapter("lora", 1, tmp_path / "lora.safetensors")
    ssvd = train_adapter("ssvd", 1, tmp_path / "ssvd.safetensors")
    base = TinyNet().state_dict()
    with pytest.raises(PeftConfigError, match="the list of adapters is empty"):
        AdapterMerge(base, [], "ties")
    with pytest.raises(PeftConfigError, match="unknown merge method 'tie'"):
        AdapterMerge(base, [lora], "tie")
    with pytest.raises(PeftConfigError, match="has no knob 'lambda'"):
        AdapterMerge(base, [lora], "ties", **{"lambda": 0.5})
    other = copy.deepcopy(base)
    other["proj_in.weight"] = other["proj_in.weight"] + 1.0
    with pytest.raises(PeftConfigError, match=r"was trained on another base model: the weight of proj_in"):
        AdapterMerge(other, [lora], "ties")
    smaller = {key: value for key, value in base.items() if not key.startswith("head.")}
    with pytest.raises(PeftConfigError, match=r"adapts head, which the base model has not"):
        AdapterMerge(smaller, [lora], "ties")
    with pytest.raises(PeftConfigError, match="lora adapters have no such core"):
        AdapterMerge(base, [lora, ssvd], "ties").adapter(form="ssvd_core")
    with pytest.raises(PeftConfigError, match="rank belongs to the lora form"):
        AdapterMerge(base, [ssvd], "ties").adapter(rank=2)
    with pytest.raises(PeftConfigError, match="form lora or ssvd_core; got 'dense'"):
        AdapterMerge(base, [ssvd], "ties").adapter(form="dense")
    with pytest.raises(PeftConfigError, match=r"adapter file '.*nope.safetensors' does not exist"):
        AdapterMerge(base, [tmp_path / "nope.safetensors"], "ties")


def test_a_failed_merge_leaves_no_file(tmp_path):
    lora = train_adapter("lora", 1, tmp_path / "lora.safetensors")
    merge = AdapterMerge(TinyNet().state_dict(), [lora], "ties")
    merge.knobs["density"] = "dense"  # fails inside the merge, after the output was opened
    with pytest.raises(TypeError):
        merge.save(tmp_path / "out" / "merged.pth")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
