"""The round trip as a guarantee: the model you load is the model you trained, for every method.

One matrix over every method (``round_trip_cases.CASES``; HDMoLE where a cell applies to it) and
the ways a model is carried around: train/eval switches, save and load in a fresh process, resume
(model and optimizer state into a freshly injected model), merge, unmerge, a merged model's state
dict loaded back, DistributedDataParallel (two gloo processes) and bfloat16. The ESPnet cells
(plugin inference, ``--peft_merge``, the merged export decoded by stock ESPnet) are in
``tests/espnet_plugins/test_round_trip_espnet.py``.

Stated tolerances: outputs are bitwise equal where the path computes the same thing (switches,
reload, resume, DDP); a merge folds the update into W in float32 (relative 1e-5 in float32, 5e-2
in bfloat16), and unmerging subtracts it again to the same precision.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from round_trip_cases import CASES, MERGEABLE, RoundTripNet, adapted_model, inputs, train_steps, trainable

from ssvd_peft.checkpoint import save_adapter
from ssvd_peft.inject import iter_adapter_layers, merge_adapters, unmerge_adapters
from ssvd_peft.layers.hdmole import RoutedMergeError
from ssvd_peft.methods.hdmole_routing import merge_domain_experts

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float(torch.linalg.norm(value - reference) / torch.linalg.norm(reference))


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in iter_adapter_layers(model)}


@pytest.mark.parametrize("case", CASES)
def test_train_and_eval_switches_change_nothing(case):
    model = adapted_model(case).eval()
    x = inputs()
    first = model(x)
    weights = base_weights(model)
    model.train()
    in_training = model(x)
    model.eval()
    assert torch.equal(model(x), first)
    assert torch.equal(in_training, first), "no dropout here: training mode computes the same"
    assert all(torch.equal(weights[name], w) for name, w in base_weights(model).items())


@pytest.fixture(scope="module")
def fresh_process_outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """(outputs in this process, outputs of the adapters loaded in a fresh process) per case."""
    directory = tmp_path_factory.mktemp("fresh")
    expected = {}
    for case in CASES:
        model = adapted_model(case)
        optimizer = torch.optim.Adam(trainable(model), lr=1e-2)
        train_steps(model, optimizer, 2)
        with torch.no_grad():
            expected[case] = model(inputs())
        save_adapter(model, directory / f"{case}.pt")
    env_path = f"{TESTS}:{REPO}"
    subprocess.run(
        [sys.executable, str(TESTS / "fresh_process_loader.py"), str(directory)],
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    return expected, torch.load(directory / "outputs.pt", weights_only=True)


@pytest.mark.parametrize("case", CASES)
def test_save_and_load_in_a_fresh_process_gives_identical_outputs(case, fresh_process_outputs):
    expected, loaded = fresh_process_outputs
    assert torch.equal(loaded[case], expected[case])


@pytest.mark.parametrize("case", CASES)
def test_resume_from_model_and_optimizer_state_continues_exactly(case):
    straight = adapted_model(case)
    straight_optimizer = torch.optim.Adam(trainable(straight), lr=1e-2)
    train_steps(straight, straight_optimizer, 4)

    first = adapted_model(case)
    optimizer = torch.optim.Adam(trainable(first), lr=1e-2)
    train_steps(first, optimizer, 2)
    checkpoint = {"model": first.state_dict(), "optimizer": optimizer.state_dict()}
    resumed = adapted_model(case, init_weights=True, seed=99)  # a new job, another random state
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.Adam(trainable(resumed), lr=1e-2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train_steps(resumed, resumed_optimizer, 2, first=2)

    x = inputs()
    assert torch.equal(resumed(x), straight(x))


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_keeps_the_output_and_unmerge_restores_the_weights(case):
    model = adapted_model(case).eval()
    x = inputs()
    adapted = model(x)
    weights = base_weights(model)
    merge_adapters(model)
    assert relative_error(model(x), adapted) < 1e-5
    unmerge_adapters(model)
    assert relative_error(model(x), adapted) < 1e-5
    for name, weight in base_weights(model).items():
        assert relative_error(weight, weights[name]) < 1e-6, name


@pytest.mark.parametrize("case", MERGEABLE)
def test_a_merged_models_state_dict_reloads_without_applying_the_adapter_twice(case):
    model = adapted_model(case).eval()
    x = inputs()
    adapted = model(x)
    merge_adapters(model)
    state = model.state_dict()
    fresh = adapted_model(case, init_weights=True, seed=7).eval()
    fresh.load_state_dict(state)
    assert relative_error(fresh(x), adapted) < 1e-5


def test_hdmole_refuses_an_exact_merge_and_undoes_a_domain_merge():
    model = adapted_model("hdmole").eval()
    weights = base_weights(model)
    with pytest.raises(RoutedMergeError, match="merge_domain_experts"):
        merge_adapters(model)
    merge_domain_experts(model, domain=1)
    assert not all(torch.equal(weights[name], w) for name, w in base_weights(model).items())
    unmerge_adapters(model)
    for name, weight in base_weights(model).items():
        assert relative_error(weight, weights[name]) < 1e-6, name


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks' results of ``ddp_worker.py`` (two gloo processes, DDP's defaults)."""
    directory = tmp_path_factory.mktemp("ddp")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(port), str(TESTS / "ddp_worker.py"), str(directory)]
    env = {"PYTHONPATH": f"{TESTS}:{REPO}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, timeout=600, capture_output=True)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("case", CASES)
def test_distributed_data_parallel_trains_with_its_defaults(case, ddp_results):
    """find_unused_parameters=False: every registered adapter parameter must get a gradient."""
    for rank in ddp_results:
        assert rank["results"][case] == "ok"
    assert ddp_results[0]["sums"][case] == ddp_results[1]["sums"][case]


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_follows_the_float32_model(case):
    model = adapted_model(case).eval()
    x = inputs()
    reference = model(x)
    model.to(torch.bfloat16)
    output = model(x.to(torch.bfloat16))
    assert bool(torch.isfinite(output).all()) and relative_error(output, reference) < 5e-2
    if case in MERGEABLE:
        merge_adapters(model)
        assert relative_error(model(x.to(torch.bfloat16)), output) < 5e-2
        unmerge_adapters(model)
    assert isinstance(model, RoundTripNet)
