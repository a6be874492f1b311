"""Reading models tensor by tensor without mapping them, and writing a merged model as it comes:
both formats, every dtype, views and checkpoints, read back by torch and safetensors themselves."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging.sinks import write_state_dict
from ssvd_peft.merging.sources import TensorSpec, open_source


@pytest.fixture
def state() -> OrderedDict:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 6, generator=generator)
    return OrderedDict(
        weight=torch.randn(3, 4, generator=generator),
        half=torch.randn(5, generator=generator).half(),
        bfloat=torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        double=torch.randn(2, 2, generator=generator, dtype=torch.float64),
        counter=torch.tensor(7),
        mask=torch.tensor([True, False, True]),
        rows=shared[1:3],  # a view of part of a storage
        transposed=shared.T,  # a non-contiguous view
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
    )


def assert_same(actual, expected) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("container", ["torch", "checkpoint", "safetensors"])
def test_every_tensor_reads_back_with_its_dtype_and_shape(container, state, tmp_path):
    path = tmp_path / ("m.safetensors" if container == "safetensors" else "m.pth")
    if container == "safetensors":
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    elif container == "checkpoint":
        torch.save({"model": state, "optimizers": [], "epoch": 3}, path)
    else:
        torch.save(state, path)
    source = open_source(path)
    assert sorted(source.keys()) == sorted(state)
    for key, value in state.items():
        assert source.spec(key) == TensorSpec(value.dtype, tuple(value.shape))
    assert_same({key: source.get(key) for key in state}, state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_state_written_tensor_by_tensor_is_what_torch_and_safetensors_read(suffix, state, tmp_path):
    specs = {key: TensorSpec(value.dtype, tuple(value.shape)) for key, value in state.items()}
    path = write_state_dict(tmp_path / f"out{suffix}", specs, iter(state.items()))
    if suffix == ".pth":
        assert_same(torch.load(path, weights_only=True), state)
        assert_same(torch.load(path, weights_only=True, mmap=True), state)
    else:
        assert_same(load_file(path), state)
    source = open_source(path)
    assert_same({key: source.get(key) for key in source}, state)
    assert list(tmp_path.iterdir()) == [path]


def test_a_write_that_fails_midway_leaves_nothing(state, tmp_path):
    specs = {key: TensorSpec(value.dtype, tuple(value.shape)) for key, value in state.items()}

    def failing():
        yield "weight", state["weight"]
        raise RuntimeError("merge failed")

    with pytest.raises(RuntimeError, match="merge failed"):
        write_state_dict(tmp_path / "out.pth", specs, failing())
    with pytest.raises(ValueError, match="'half'"):
        write_state_dict(tmp_path / "out.safetensors", specs, iter([("weight", state["weight"])]))
    assert list(tmp_path.iterdir()) == []


class NotATensor:
    pass


def test_files_that_are_not_state_dicts_are_refused_by_name(tmp_path):
    torch.save({"weight": torch.zeros(2), "thing": NotATensor()}, tmp_path / "object.pth")
    with pytest.raises(PeftConfigError, match=r"object\.pth.*NotATensor is not part of a state dict"):
        open_source(tmp_path / "object.pth")
    torch.save({"weight": torch.zeros(2), "steps": 3}, tmp_path / "mixed.pth")
    with pytest.raises(PeftConfigError, match="does not hold a state dict of tensors"):
        open_source(tmp_path / "mixed.pth")
    (tmp_path / "text.pth").write_text("not a model")
    with pytest.raises(PeftConfigError, match=r"text\.pth' is not a readable model file"):
        open_source(tmp_path / "text.pth")


def test_a_truncated_safetensors_file_is_named_when_read(state, tmp_path):
    save_file({"weight": state["weight"]}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-8])
    source = open_source(tmp_path / "m.safetensors")
    with pytest.raises(PeftConfigError, match="truncated"):
        source.get("weight")
