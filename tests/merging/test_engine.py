"""Merging whole models tensor by tensor: the tensor rules, files in and out, reading on demand,
and one clear error for every bad input with nothing left behind."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import pytest
import torch
from safetensors.torch import save_file

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging import get_merge_method
from ssvd_peft.merging.engine import merge_models, merge_models_to_file, merge_tensors


def tiny_state(seed: int | None = None, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A base state dict (seed None) or a fine-tune of ``base``: the frozen tensor, the counter and
    the norm stay as they are; the weights, biases and vocabulary move."""
    generator = torch.Generator().manual_seed(0)
    if base is None:
        return {
            "encoder.linear.weight": torch.randn(8, 6, generator=generator),
            "encoder.linear.bias": torch.randn(8, generator=generator),
            "encoder.frozen.weight": torch.randn(4, 4, generator=generator),
            "encoder.norm.num_batches_tracked": torch.tensor(7),
            "decoder.embed.0.weight": torch.randn(10, 6, generator=generator),
            "ctc.ctc_lo.weight": torch.randn(10, 8, generator=generator),
        }
    generator.manual_seed(seed)
    state = copy.deepcopy(base)
    for key in (
        "encoder.linear.weight",
        "encoder.linear.bias",
        "decoder.embed.0.weight",
        "ctc.ctc_lo.weight",
    ):
        state[key] = state[key] + 0.1 * torch.randn(state[key].shape, generator=generator)
    state["encoder.norm.num_batches_tracked"] = torch.tensor(7 + seed)
    return state


@pytest.fixture
def states():
    base = tiny_state()
    return base, [tiny_state(seed, base) for seed in (1, 2, 3)]


def task_vector_mean(base, models, key):
    return base[key] + sum(m[key] - base[key] for m in models) / len(models)


def test_task_arithmetic_merges_every_moving_tensor_and_keeps_the_rest(states):
    base, models = states
    merged = merge_models(base, models, "task_arithmetic", scaling=0.5, vocabulary=[])
    expected = base["encoder.linear.weight"] + 0.5 * sum(
        m["encoder.linear.weight"] - base["encoder.linear.weight"] for m in models
    )
    torch.testing.assert_close(merged["encoder.linear.weight"], expected)
    assert torch.equal(merged["encoder.frozen.weight"], base["encoder.frozen.weight"])
    assert merged["encoder.norm.num_batches_tracked"] == base["encoder.norm.num_batches_tracked"]
    assert list(merged) == list(base)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv_m"])
def test_running_statistics_take_the_mean_whatever_the_method(method):
    base = {
        "encoder.conv.norm.running_var": torch.ones(6),
        "encoder.conv.norm.running_mean": torch.zeros(6),
        "encoder.linear.weight": torch.eye(6),
    }
    models = []
    for t in range(3):  # every domain's variance fell, as a fine-tune on quieter speech can make it
        models.append(
            {
                "encoder.conv.norm.running_var": torch.full((6,), 0.2 + 0.1 * t),
                "encoder.conv.norm.running_mean": torch.full((6,), 0.5 * t),
                "encoder.linear.weight": torch.eye(6) + 0.01 * (t + 1),
            }
        )
    merged = merge_models(base, models, method, scaling=1.0)
    for key in ("encoder.conv.norm.running_var", "encoder.conv.norm.running_mean"):
        torch.testing.assert_close(merged[key], task_vector_mean(base, models, key))
    assert bool((merged["encoder.conv.norm.running_var"] > 0).all())
    if method == "task_arithmetic":  # the weights themselves still take the method: 1 + 3 x scaling
        torch.testing.assert_close(merged["encoder.linear.weight"], torch.eye(6) + 0.06)


def test_subspace_methods_take_the_task_vector_mean_off_2d_weights_and_on_the_vocabulary(states):
    base, models = states
    merged = merge_models(base, models, "tsv_m")
    for key in ("encoder.linear.bias", "decoder.embed.0.weight", "ctc.ctc_lo.weight"):
        torch.testing.assert_close(merged[key], task_vector_mean(base, models, key))
    method = get_merge_method("tsv_m")
    direct = method.function(
        base["encoder.linear.weight"].clone(), torch.stack([m["encoder.linear.weight"] for m in models]),
        torch.ones(3), generator=torch.Generator(), **method.resolved_knobs({}),
    )  # fmt: skip
    torch.testing.assert_close(merged["encoder.linear.weight"], direct)
    own = merge_models(base, models, "tsv_m", vocabulary=[])
    assert not torch.allclose(own["ctc.ctc_lo.weight"], merged["ctc.ctc_lo.weight"])


def test_the_stored_dtype_comes_back(states):
    base, models = states
    half = [{k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in m.items()} for m in models]
    base_half = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in base.items()}
    merged = merge_models(base_half, half, "ties", density=0.5)
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in base_half.items()}


def test_a_seeded_merge_is_reproducible_and_another_seed_differs(states):
    base, models = states
    first = merge_models(base, models, "task_arithmetic", seed=3, dare_drop=0.5)
    assert all(
        torch.equal(first[k], v)
        for k, v in merge_models(base, models, "task_arithmetic", seed=3, dare_drop=0.5).items()
    )
    other = merge_models(base, models, "task_arithmetic", seed=4, dare_drop=0.5)
    assert not torch.equal(first["encoder.linear.weight"], other["encoder.linear.weight"])


def test_files_of_both_formats_merge_as_the_state_dicts_do(states, tmp_path):
    base, models = states
    torch.save(base, tmp_path / "base.pth")
    paths = []
    for i, model in enumerate(models):
        if i % 2:
            save_file(model, tmp_path / f"m{i}.safetensors")
            paths.append(tmp_path / f"m{i}.safetensors")
        else:
            torch.save({"model": model, "optimizers": []}, tmp_path / f"m{i}.pth")  # an ESPnet checkpoint
            paths.append(tmp_path / f"m{i}.pth")
    from_files = merge_models(tmp_path / "base.pth", paths, "ties", density=0.5)
    in_memory = merge_models(base, models, "ties", density=0.5)
    assert all(torch.equal(from_files[k], v) for k, v in in_memory.items())
    for suffix in (".safetensors", ".pth"):
        written = merge_models_to_file(base, models, tmp_path / f"out{suffix}", "ties", density=0.5)
        reread = merge_models(written, [written], "soup")
        assert all(torch.equal(reread[k], v) for k, v in in_memory.items())


class Recording(Mapping):
    """A state dict that records which tensors were read."""

    def __init__(self, state: dict[str, torch.Tensor], log: list[tuple[str, str]], name: str) -> None:
        self.state, self.log, self.name = state, log, name

    def __getitem__(self, key: str) -> torch.Tensor:
        self.log.append((self.name, key))
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def test_models_are_read_one_tensor_at_a_time(states):
    base, models = states
    log: list[tuple[str, str]] = []
    recorded = [Recording(m, log, f"m{i}") for i, m in enumerate(models)]
    stream = merge_tensors(Recording(base, log, "base"), recorded, "task_arithmetic")
    first_name, _ = next(stream)
    assert {key for _, key in log} == {first_name}, "nothing beyond the first tensor was read"
    assert len(set(log)) == len(models) + 1
    rest = list(stream)
    assert len(rest) == len(base) - 1 and len(set(log)) == len(base) * (len(models) + 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop", r"model 2 lacks 'ctc\.ctc_lo\.weight'"),
        ("extra", r"model 2 has 'encoder\.extra', which base has not"),
        ("shape", r"encoder\.linear\.bias: model 2 has shape \(9,\), base \(8,\)"),
    ],
)
def test_models_of_another_architecture_are_refused_with_the_first_difference_and_no_file(
    change, message, states, tmp_path
):
    base, models = states
    broken = dict(models[1])
    if change == "drop":
        del broken["ctc.ctc_lo.weight"]
    elif change == "extra":
        broken["encoder.extra"] = torch.zeros(2)
    else:
        broken["encoder.linear.bias"] = torch.zeros(9)
    with pytest.raises(PeftConfigError, match=message):
        merge_models_to_file(base, [models[0], broken], tmp_path / "out.pth", "task_arithmetic")
    assert list(tmp_path.iterdir()) == []


def test_bad_calls_get_one_message_each(states):
    base, models = states
    with pytest.raises(PeftConfigError, match="the list of models is empty"):
        merge_models(base, [], "ties")
    with pytest.raises(PeftConfigError, match="'ties' works on task vectors and needs the base model"):
        merge_models(None, models, "ties")
    with pytest.raises(PeftConfigError, match="2 weights for 3 models"):
        merge_models(base, models, "ties", weights=[1.0, 2.0])
    with pytest.raises(PeftConfigError, match="unknown merge method 'tie'"):
        merge_models(base, models, "tie")
    with pytest.raises(PeftConfigError, match=r"model file '/nope\.pth' does not exist"):
        merge_models(base, ["/nope.pth"], "soup")


def test_a_model_that_is_not_a_fine_tune_of_the_base_is_refused_with_no_file(tmp_path):
    generator = torch.Generator().manual_seed(5)
    base = {"encoder.big.weight": torch.randn(40, 40, generator=generator)}
    tuned = {
        "encoder.big.weight": base["encoder.big.weight"] + 0.05 * torch.randn(40, 40, generator=generator)
    }
    unrelated = {"encoder.big.weight": torch.randn(40, 40, generator=generator)}
    merge_models(base, [tuned], "task_arithmetic")
    with pytest.raises(
        PeftConfigError, match=r"model 2 is not a fine-tune of the base: its encoder\.big\.weight"
    ):
        merge_models_to_file(base, [tuned, unrelated], tmp_path / "out.pth", "task_arithmetic")
    assert list(tmp_path.iterdir()) == []
    merged = merge_models(base, [tuned, unrelated], "task_arithmetic", max_change=None)
    expected = tuned["encoder.big.weight"] + unrelated["encoder.big.weight"] - base["encoder.big.weight"]
    torch.testing.assert_close(merged["encoder.big.weight"], expected)
