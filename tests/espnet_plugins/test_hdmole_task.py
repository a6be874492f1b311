"""HDMoLE in an ESPnet model, in process: its options in peft_conf (the old peft_hdmole block
refused), the loss and statistics hook, domain labels, and the router in adapter-only state dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from espnet2.torch_utils.recursive_op import recursive_average
from espnet_runs import TINY_CONFIG
from tiny_corpus import TOKENS

from espnet_plugins.extensions import extension_for
from espnet_plugins.hdmole import LayerStatistics, domain_labels
from espnet_plugins.options import peft_options
from espnet_plugins.tasks.asr import PeftASRTask
from ssvd_peft.adapter_state import load_adapter_entries
from ssvd_peft.config import PeftConfigError
from ssvd_peft.layers.routing import IGNORE_DOMAIN
from ssvd_peft.methods.hdmole_routing import domain_router, hdmole_aux_losses

pytest.importorskip("espnet2")

HDMOLE = "target_modules: [linear_q, w_1], num_domains: 2, rank: 2"
ROUTER = (
    "domain_weight: 0.5, balance_weight: 0.1, router_source: encoder.encoders.0.self_attn, router_dim: 64"
)
BLOCK = ["--peft", "hdmole", "--peft_conf", f"{{{HDMOLE}, {ROUTER}}}"]


def build(tmp_path: Path, *block: str) -> torch.nn.Module:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    args = PeftASRTask.get_parser().parse_args(
        ["--config", str(TINY_CONFIG), "--token_list", str(tokens), "--output_dir", str(tmp_path), *block]
    )
    torch.manual_seed(0)
    return PeftASRTask.build_model(args)


def batch(domains: list[int] | None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    values = {
        "speech": torch.randn(2, 1600, generator=generator),
        "speech_lengths": torch.tensor([1600, 1200]),
        "text": torch.tensor([[2, 3, 4], [3, 5, -1]]),
        "text_lengths": torch.tensor([3, 2]),
    }
    if domains is not None:
        values |= {
            "domain": torch.tensor(domains).unsqueeze(1),
            "domain_lengths": torch.ones(2, dtype=torch.long),
        }
    return values


@pytest.fixture
def model(tmp_path: Path) -> torch.nn.Module:
    built = build(tmp_path, *BLOCK)
    with torch.no_grad():
        domain_router(built).proj.weight.normal_()
    return built


def test_the_training_loss_adds_the_weighted_auxiliary_losses_and_logs_them(model) -> None:
    model.train()
    loss, stats, _ = model(**batch([0, 1]))
    aux = hdmole_aux_losses(model, torch.tensor([0, 1]))
    asr = stats["loss_att"] * 0.7 + stats["loss_ctc"] * 0.3
    torch.testing.assert_close(loss, asr + 0.5 * aux["domain"] + 0.1 * aux["balance"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["loss"], loss.detach())
    torch.testing.assert_close(stats["hdmole_domain"], aux["domain"].detach().reshape(1))
    assert "hdmole_domain_accuracy" not in stats
    loss.backward()
    assert domain_router(model).proj.weight.grad.abs().sum() > 0


def test_without_domain_labels_the_domain_loss_is_skipped(model) -> None:
    model.train()
    loss, stats, _ = model(**batch(None))
    assert "hdmole_domain" not in stats and "hdmole_balance" in stats
    asr = stats["loss_att"] * 0.7 + stats["loss_ctc"] * 0.3
    torch.testing.assert_close(loss, asr + 0.1 * stats["hdmole_balance"], rtol=1e-5, atol=1e-5)


def test_validation_reports_routing_statistics_and_sums_them_per_layer(model) -> None:
    model.eval()
    with torch.no_grad():
        _, stats, _ = model(**batch([0, 1]))
        _, second, _ = model(**batch([1, 0]))
    assert {"hdmole_active_experts", "hdmole_routing_entropy", "hdmole_domain_accuracy"} <= set(stats)
    assert stats["hdmole_domain_accuracy"] + second["hdmole_domain_accuracy"] == pytest.approx(1.0)
    means = extension_for("hdmole").statistics[model].means()
    assert means["domain_accuracy"] == pytest.approx(0.5)
    assert "encoder.encoders.1.feed_forward.w_1.active_experts" in means


@pytest.mark.parametrize("training", [True, False])
def test_every_statistic_has_the_shape_of_the_weight_so_ranks_can_average_it(model, training) -> None:
    model.train(training)
    with torch.set_grad_enabled(training):
        _, stats, weight = model(**batch([0, 1]))
    stats = {key: value for key, value in stats.items() if value is not None}
    assert {key: value.shape for key, value in stats.items()} == dict.fromkeys(stats, weight.shape)
    averaged, _ = recursive_average(stats, weight)
    torch.testing.assert_close(averaged["hdmole_balance"], stats["hdmole_balance"][0])


def test_without_labels_every_trainable_parameter_is_in_the_graph_of_two_stage_routing(
    tmp_path: Path,
) -> None:
    two_stage = [*BLOCK[:3], f"{{{HDMOLE}, {ROUTER}, combination: two_stage}}"]
    model = build(tmp_path, *two_stage)
    model.train()
    loss, stats, _ = model(**batch(None))
    asr = stats["loss_att"] * 0.7 + stats["loss_ctc"] * 0.3
    torch.testing.assert_close(loss, asr + 0.1 * stats["hdmole_balance"], rtol=1e-5, atol=1e-5)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert domain_router(model).proj.weight.grad.abs().sum() == 0


def test_the_router_is_an_adapter_entry_and_loads_back(model, tmp_path: Path) -> None:
    state = model.state_dict()
    assert state["peft_adapters.default.proj.weight"].shape == (2, 64)
    fresh = build(tmp_path, *BLOCK)
    load_adapter_entries(fresh, state, [], "state")
    torch.testing.assert_close(domain_router(fresh).proj.weight, domain_router(model).proj.weight)
    assert domain_router(fresh).proj.weight.requires_grad


def test_domain_labels_mark_negative_ids_unlabelled_and_refuse_unknown_domains() -> None:
    labels = domain_labels({"domain": torch.tensor([[1], [-1], [0]])}, 2)
    assert labels.tolist() == [1, IGNORE_DOMAIN, 0]
    assert domain_labels({}, 2) is None
    with pytest.raises(ValueError, match="num_domains=2"):
        domain_labels({"domain": torch.tensor([[2]])}, 2)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("domain_wieght: 1.0", "unknown option 'domain_wieght'. Did you mean 'domain_weight'"),
        ("router_side: middle", "router_side must be one of input, output"),
        ("balance_weight: -1.0", ">= 0"),
    ],
)
def test_bad_hdmole_options_are_refused(option, message, tmp_path: Path) -> None:
    with pytest.raises(PeftConfigError, match=message):
        build(tmp_path, "--peft", "hdmole", "--peft_conf", f"{{{HDMOLE}, {option}}}")


def test_an_old_peft_hdmole_block_is_refused_with_where_its_keys_went() -> None:
    args = PeftASRTask.get_parser().parse_args(
        [
            "--peft",
            "hdmole",
            "--peft_conf",
            f"{{{HDMOLE}}}",
            "--peft_hdmole",
            "{domain_weight: 1, router_side: output}",
        ]
    )
    with pytest.raises(
        PeftConfigError,
        match=r"peft_hdmole is gone: its keys \['domain_weight', 'router_side'\] go into peft_conf",
    ):
        peft_options(args)


def test_router_options_are_not_per_module(tmp_path: Path) -> None:
    overrides = "module_overrides: {linear_q: {router_side: output}}"
    with pytest.raises(PeftConfigError, match="unknown module_overrides 'router_side'"):
        build(tmp_path, "--peft", "hdmole", "--peft_conf", f"{{{HDMOLE}, {overrides}}}")


def test_layer_statistics_are_weighted_by_batch_size(tmp_path: Path) -> None:
    statistics = LayerStatistics()
    statistics.add({"a.active_experts": 1.0}, 3.0)
    statistics.add({"a.active_experts": 2.0}, 1.0)
    statistics.write(tmp_path / "stats" / "valid.1.txt")
    assert (tmp_path / "stats" / "valid.1.txt").read_text() == "a.active_experts 1.2500\n"
    statistics.reset()
    assert statistics.means() == {}


def test_a_router_on_utterance_normalised_encoder_input_is_refused(tmp_path: Path) -> None:
    block = [*BLOCK[:3], f"{{{HDMOLE}, router_source: encoder, router_side: input}}"]
    with pytest.raises(
        PeftConfigError, match=r"utterance_mvn makes zero in every utterance.*router_source: encoder\.embed"
    ):
        build(tmp_path, *block)


def test_a_router_on_the_subsampling_output_tells_utterances_apart(tmp_path: Path) -> None:
    model = build(tmp_path, *BLOCK[:3], f"{{{HDMOLE}, router_source: encoder.embed, router_side: output}}")
    router = domain_router(model)
    assert router.proj.in_features == 64
    with torch.no_grad():
        router.proj.weight.normal_()
    model.eval()
    model(**batch([0, 1]))
    logits = router.context.domain_logits
    assert logits.shape == (2, 2) and not torch.allclose(logits[0], logits[1], atol=1e-3)
