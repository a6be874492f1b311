"""HDMoLE: y = x W^T + b + sum_i w_i(x) (alpha / r) B_i A_i x over N LoRA experts.

w comes from the local router p, the global domain router g (tied to experts by pi) and a
dynamic threshold tau: s = q - tau, m = [s > 0], w = s m / sum s m, argmax q if none passes.
The fixed-domain merge folds delta W_d = (alpha / r) sum_{i in G_d} B_i A_i / |G_d| into W.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from layer_builders import add_adapter, make_linear, rel_err
from torch import nn

from ssvd_peft.budget import estimate_budget
from ssvd_peft.checkpoint import load_adapter, save_adapter
from ssvd_peft.config import PeftConfigError, config_from_dict
from ssvd_peft.inject import (
    inject_adapters,
    merge_adapters,
    merge_and_unload,
    unload,
    unmerge_adapters,
)
from ssvd_peft.layers import AdapterLinear, HdmoleAdapter
from ssvd_peft.layers.hdmole import RoutedMergeError
from ssvd_peft.layers.routing import IGNORE_DOMAIN, combine_routes, masked_mean_pool
from ssvd_peft.methods.hdmole import HdmoleConfig
from ssvd_peft.methods.hdmole_routing import (
    attach_domain_router,
    domain_router,
    hdmole_aux_losses,
    hdmole_statistics,
    merge_domain_experts,
    routing_context,
    set_domain_probs,
)

# Domain 0: experts 0, 1; domain 1: expert 2; expert 3 is shared (G_0 = {0, 1, 3}, G_1 = {2, 3}).
EXPERT_DOMAINS = [0, 0, 1, -1]
OPTIONS = {"rank": 3, "alpha": 6.0, "num_domains": 2, "expert_domains": EXPERT_DOMAINS}


class TwoLayers(nn.Module):
    """in 8 -> 12 -> 8 with a ReLU; the forward takes (B, T, 8) features and optional lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def hdmole_layer(**options) -> tuple[nn.Linear, AdapterLinear, HdmoleAdapter]:
    base = make_linear(8, 12)
    wrapper = add_adapter(copy.deepcopy(base), "hdmole", **{**OPTIONS, **options})
    return base, wrapper, wrapper.peft_adapters["default"]


def hdmole_model(**options) -> TwoLayers:
    torch.manual_seed(0)
    model = TwoLayers()
    inject_adapters(model, "hdmole", target_modules=["up", "down"], **{**OPTIONS, **options})
    return model


def reference_output(
    adapter: HdmoleAdapter, base: nn.Linear, x: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """The layer's formula token by token, expert by expert (product combination, learnable tau)."""
    tau = adapter.tau_max * torch.sigmoid(adapter.threshold_theta)
    gate = torch.stack([g[:, d] if d >= 0 else torch.ones(len(g)) for d in EXPERT_DOMAINS], dim=-1)
    out = base(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            p = torch.softmax(adapter.router(x[b, t]), dim=-1)
            q = p * gate[b] / (p * gate[b]).sum()
            s = q - tau
            w = torch.where(s > 0, s, 0.0) / torch.where(s > 0, s, 0.0).sum()
            for i in range(adapter.num_experts):
                expert = adapter.scaling * adapter.lora_B[i] @ (adapter.lora_A[i] @ x[b, t])
                out[b, t] = out[b, t] + w[i] * expert
    return out


@pytest.mark.parametrize("combination", ["product", "mix", "two_stage"])
@pytest.mark.parametrize("threshold", ["learnable", "input"])
def test_identity_at_init(combination, threshold):
    base, wrapper, _ = hdmole_layer(combination=combination, threshold=threshold)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(wrapper(x), base(x), rtol=0, atol=0)


def test_experts_start_kaiming_uniform_with_zero_b():
    _, _, adapter = hdmole_layer()
    bound = 1.0 / math.sqrt(8)
    for expert_A in adapter.lora_A.detach():
        assert 0.6 * bound < float(expert_A.abs().max()) <= bound
    assert torch.count_nonzero(adapter.lora_B) == 0


def test_dense_stacked_compute_equals_the_formula_per_token_and_expert():
    base, wrapper, adapter = hdmole_layer(init_weights=False)
    with torch.no_grad():
        adapter.router.weight.mul_(3.0)  # peaked routing, so some experts drop out
    x = torch.randn(2, 4, 8)
    g = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    adapter.context.set(g)
    expected = reference_output(adapter, base, x, g)
    assert rel_err(expected, base(x)) > 1e-2
    assert 1.0 < float(adapter.route(x).gt(0).sum(-1).float().mean()) < 4.0, "mixed numbers of experts"
    torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)


def test_the_combinations_follow_their_formulas():
    expert_domain = torch.tensor(EXPERT_DOMAINS)
    logits = torch.randn(3, 4)
    p = torch.softmax(logits, dim=-1)
    g = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    gate = torch.stack([g[:, 0], g[:, 0], g[:, 1], torch.ones(3)], dim=-1)

    mixed = combine_routes(logits, g.log(), expert_domain, "mix", mix_beta=0.25)
    torch.testing.assert_close(mixed, 0.25 * gate / gate.sum(-1, keepdim=True) + 0.75 * p)

    product = combine_routes(logits, g.log(), expert_domain, "product")
    torch.testing.assert_close(product, p * gate / (p * gate).sum(-1, keepdim=True))

    grouped = combine_routes(logits[:2], g[:2].log(), expert_domain, "two_stage")
    group = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # top-1 domain 0, then 1
    torch.testing.assert_close(grouped, p[:2] * group / (p[:2] * group).sum(-1, keepdim=True))
    tied = combine_routes(logits[2:], g[2:].log(), expert_domain, "two_stage")  # g = (1/2, 1/2): both
    torch.testing.assert_close(tied, p[2:])


@pytest.mark.parametrize("gap", [95.0, 120.0])
@pytest.mark.parametrize(
    ("combination", "expected"),
    [("two_stage", [1 / 3, 1 / 3, 0.0, 1 / 3]), ("product", [0.25, 0.25, 0.25, 0.25])],
)
def test_routing_and_its_gradients_stay_finite_when_the_routers_disagree_by_far(gap, combination, expected):
    """The local router favours expert 2 (domain 1) by ``gap`` and the domain router domain 0 by
    ``gap``: p of G_0 and g_1 are exp(-gap), which float32 rounds to 0 or a denormal. Exactly,
    q = softmax(l + log gate): 1/3 on G_0 for two_stage, and uniform for product (the two
    gaps cancel); tau = 1/8 then passes all of them with equal weights."""
    _, wrapper, adapter = hdmole_layer(combination=combination, init_weights=False)
    with torch.no_grad():
        adapter.router.weight.zero_()
        adapter.router.bias.copy_(torch.tensor([0.0, 0.0, gap, 0.0]))
    domain_logits = torch.tensor([[gap, 0.0]], requires_grad=True)
    adapter.context.set(domain_logits.softmax(dim=-1), domain_logits)
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(adapter.route(x), torch.tensor(expected).expand(1, 3, 4))
    output = wrapper(x)
    assert torch.isfinite(output).all()
    output.square().sum().backward()
    for name, parameter in [*adapter.named_parameters(), ("domain_logits", domain_logits)]:
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def test_the_threshold_sets_how_many_experts_each_token_uses():
    _, _, adapter = hdmole_layer(expert_domains=[0, 0, 1, 1])
    with torch.no_grad():
        adapter.router.weight.zero_()
        adapter.router.bias.zero_()
        adapter.router.weight[0, 0] = 10.0  # x_0 large: expert 0 takes almost all of q
        adapter.router.weight[1, 1] = 10.0  # x_1 large: expert 1 as well
    x = torch.zeros(3, 8)
    x[0, 0] = 2.0  # q ~ (1, 0, 0, 0)         -> 1 expert
    x[1, :2] = 2.0  # q ~ (1/2, 1/2, 0, 0)    -> 2 experts
    # x[2] = 0: q = 1/4 each, tau = tau_max / 2 = 1/8 -> all 4 experts
    weights = adapter.route(x)
    assert weights.gt(0).sum(dim=-1).tolist() == [1, 2, 4]
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3))
    assert float(adapter.last_routing.active_experts) == pytest.approx(7 / 3)


def test_raising_the_threshold_drops_experts():
    _, _, adapter = hdmole_layer()
    x = torch.randn(64, 8)
    counts = []
    for theta in (-6.0, 0.0, 6.0):
        with torch.no_grad():
            adapter.threshold_theta.fill_(theta)
        counts.append(float(adapter.route(x).gt(0).sum(-1).float().mean()))
    assert counts[0] > counts[1] > counts[2] >= 1.0


def test_a_token_no_expert_passes_keeps_its_top_expert():
    base, wrapper, adapter = hdmole_layer(tau_max=1.0, init_weights=False)
    with torch.no_grad():
        adapter.threshold_theta.fill_(20.0)  # tau ~ 1 > every q
    x = torch.randn(2, 5, 8)
    weights = adapter.route(x)
    assert weights.gt(0).sum(dim=-1).eq(1).all()
    gate = torch.tensor([0.5, 0.5, 0.5, 1.0])  # uniform g over 2 domains; expert 3 is shared
    top = (adapter.router(x).softmax(dim=-1) * gate).argmax(dim=-1)
    torch.testing.assert_close(weights, F.one_hot(top, 4).float())
    expert_out = torch.einsum("btn,nor,nri,bti->bto", weights, adapter.lora_B, adapter.lora_A, x)
    torch.testing.assert_close(wrapper(x), base(x) + adapter.scaling * expert_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", ["learnable", "input"])
def test_gradients_reach_experts_local_routers_global_router_and_thresholds(threshold):
    model = hdmole_model(threshold=threshold, init_weights=False)
    attach_domain_router(model, feature_dim=8, source_module="up")
    x = torch.randn(4, 6, 8)
    labels = torch.tensor([0, 1, 1, IGNORE_DOMAIN])
    out = model(x)
    losses = hdmole_aux_losses(model, labels)
    (out.pow(2).mean() + losses["domain"] + 0.01 * losses["balance"]).backward()
    names = ["lora_A", "lora_B", "router.weight", "router.bias"]
    names += (
        ["threshold_theta"] if threshold == "learnable" else ["threshold_proj.weight", "threshold_proj.bias"]
    )
    for layer in ("up", "down"):
        adapter = model.get_submodule(layer).peft_adapters["default"]
        for name in names:
            grad = adapter.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, f"{layer}.{name}"
    router = model.peft_adapters["default"]
    assert router.proj.weight.grad.abs().sum() > 0 and router.proj.bias.grad.abs().sum() > 0
    assert model.up.base_layer.weight.grad is None


def test_the_global_router_steers_routing_even_without_the_domain_loss():
    model = hdmole_model(init_weights=False)
    attach_domain_router(model, feature_dim=8, source_module="up")
    model(torch.randn(3, 5, 8)).pow(2).sum().backward()
    assert model.peft_adapters["default"].proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("combination", "threshold", "mix_beta"),
    [
        ("product", "learnable", 0.5),
        ("product", "input", 0.5),
        ("two_stage", "learnable", 0.5),
        ("two_stage", "input", 0.5),
        ("mix", "learnable", 1.0),
    ],
)
@pytest.mark.parametrize("domain", [0, 1])
def test_fixed_domain_merge_equals_one_hot_domain_routing_with_uniform_local_routing(
    combination, threshold, mix_beta, domain
):
    """delta W_d = (alpha / r) sum_{i in G_d} B_i A_i / |G_d| = routed output for g = e_d, p = 1 / N."""
    model = hdmole_model(combination=combination, threshold=threshold, mix_beta=mix_beta, init_weights=False)
    for layer in ("up", "down"):
        adapter = model.get_submodule(layer).peft_adapters["default"]
        with torch.no_grad():
            adapter.router.weight.zero_()
            adapter.router.bias.zero_()
            if threshold == "input":
                adapter.threshold_proj.weight.normal_()  # tau(x) varies per token
    x = torch.randn(3, 5, 8)
    set_domain_probs(model, F.one_hot(torch.full((3,), domain), 2).float())
    routed = model(x)
    base_up = model.up.base_layer.weight.detach().clone()

    merge_domain_experts(model, domain)
    torch.testing.assert_close(model(x), routed, rtol=1e-5, atol=1e-5)

    adapter = model.up.peft_adapters["default"]
    group = [i for i, d in enumerate(EXPERT_DOMAINS) if d in (domain, -1)]
    expected = sum(adapter.lora_B[i] @ adapter.lora_A[i] for i in group) * adapter.scaling / len(group)
    torch.testing.assert_close(model.up.base_layer.weight - base_up, expected, rtol=1e-5, atol=1e-6)

    unmerge_adapters(model)
    torch.testing.assert_close(model.up.base_layer.weight, base_up, rtol=0, atol=1e-6)


def test_a_domain_merge_unloads_to_plain_linears():
    model = hdmole_model(init_weights=False)
    for layer in ("up", "down"):
        nn.init.zeros_(model.get_submodule(layer).peft_adapters["default"].router.weight)
        nn.init.zeros_(model.get_submodule(layer).peft_adapters["default"].router.bias)
    x = torch.randn(2, 3, 8)
    set_domain_probs(model, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    routed = model(x)
    merge_domain_experts(model, 1)
    plain = merge_and_unload(model)
    assert type(plain.up) is nn.Linear and type(plain.down) is nn.Linear
    torch.testing.assert_close(plain(x), routed, rtol=1e-5, atol=1e-5)


def test_exact_merge_is_refused_with_the_way_out():
    model = hdmole_model(init_weights=False)
    with pytest.raises(
        RoutedMergeError, match=r"cannot be merged exactly.*merge_domain_experts\(model, domain\)"
    ):
        merge_adapters(model)
    with pytest.raises(RoutedMergeError, match="not one weight matrix"):
        model.up.delta_weight()
    with pytest.raises(ValueError, match=r"domain must be in \[0, 2\)"):
        merge_domain_experts(model, 2)


@pytest.mark.parametrize("threshold", ["learnable", "input"])
@pytest.mark.parametrize(("in_features", "out_features"), [(8, 12), (12, 8)])
def test_trainable_count_equals_the_closed_formula(threshold, in_features, out_features):
    config = HdmoleConfig(target_modules=["layer"], threshold=threshold, **OPTIONS)
    wrapper = add_adapter(make_linear(in_features, out_features), "hdmole", threshold=threshold, **OPTIONS)
    counted = sum(p.numel() for p in wrapper.peft_adapters["default"].parameters())
    split = config.trainable_split(in_features, out_features)
    n, r = 4, 3
    tau = 1 if threshold == "learnable" else in_features + 1
    assert split.inner == n * r * in_features + n * (in_features + 1) + tau
    assert split.outer == n * r * out_features
    assert counted == split.total


def test_the_injection_plan_reports_the_per_layer_formula():
    model = TwoLayers()
    config = config_from_dict("hdmole", {"target_modules": ["up", "down"], **OPTIONS})
    report = estimate_budget(model, config)
    inject_adapters(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable == trainable == (4 * 3 * 20 + 4 * 9 + 1) + (4 * 3 * 20 + 4 * 13 + 1)


def test_default_expert_layout_is_domain_by_domain_then_shared():
    config = HdmoleConfig(target_modules=["x"], num_domains=3, experts_per_domain=2, shared_experts=1)
    assert config.expert_domain_map() == [0, 0, 1, 1, 2, 2, -1]
    wrapper = add_adapter(make_linear(8, 12), "hdmole", num_domains=3, experts_per_domain=2, shared_experts=1)
    assert wrapper.peft_adapters["default"].tau_max == pytest.approx(1 / 7)
    derived = HdmoleConfig(target_modules=["x"], num_experts=5, num_domains=2, shared_experts=1)
    assert derived.expert_domain_map() == [0, 0, 1, 1, -1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_domains": 0}, "num_domains must be a positive integer"),
        ({"num_experts": 5, "num_domains": 2}, r"num_experts=5 does not fit num_domains=2"),
        ({"num_experts": 3, "experts_per_domain": 2}, "does not fit"),
        ({"shared_experts": -1}, "shared_experts must be an integer >= 0"),
        ({"expert_domains": [0, 2, -1]}, r"domain ids in \[0, 2\) or -1"),
        ({"expert_domains": [0, 0, -1]}, r"domains \[1\] have no expert"),
        ({"expert_domains": [0, 1], "shared_experts": 1}, "either expert_domains or"),
        ({"expert_domains": [0, 1], "num_experts": 3}, "expert_domains has 2 entries"),
        ({"combination": "sum"}, "combination must be one of product, mix, two_stage"),
        ({"threshold": "topk"}, "threshold must be one of learnable, input"),
        ({"mix_beta": 1.5}, r"mix_beta must be in \[0, 1\]"),
        ({"tau_max": 0.0}, r"tau_max must be in \(0, 1\]"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"experts": 4}, "unknown option 'experts'. Did you mean 'num_experts'"),
    ],
)
def test_bad_options_are_refused_with_a_message(options, message):
    with pytest.raises(PeftConfigError, match=message):
        config_from_dict("hdmole", {"target_modules": ["x"], **options})


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"rank 9 is larger than this layer allows"):
        add_adapter(make_linear(8, 12), "hdmole", rank=9)


def test_without_domain_probabilities_every_domain_weighs_one_over_m():
    _, _, adapter = hdmole_layer(init_weights=False)
    x = torch.randn(2, 3, 8)
    uniform = adapter.route(x)
    adapter.context.set(torch.full((2, 2), 0.5))
    torch.testing.assert_close(adapter.route(x), uniform)


def test_probabilities_of_another_batch_size_are_refused():
    _, wrapper, adapter = hdmole_layer()
    adapter.context.set(torch.full((3, 2), 0.5))
    with pytest.raises(
        ValueError, match=r"batch of 3 utterances but an HDMoLE layer got an input of shape \(2, 5, 8\)"
    ):
        wrapper(torch.randn(2, 5, 8))


def test_all_layers_of_an_adapter_share_one_routing_context():
    model = hdmole_model()
    set_domain_probs(model, torch.tensor([[1.0, 0.0]]))
    context = routing_context(model)
    assert model.up.peft_adapters["default"].context is context is model.down.peft_adapters["default"].context
    assert torch.equal(context.domain_probs, torch.tensor([[1.0, 0.0]]))


def test_the_utterance_summary_ignores_padding():
    features = torch.randn(2, 6, 8)
    padded = features.clone()
    padded[0, 4:] = 100.0
    lengths = torch.tensor([4, 6])
    pooled = masked_mean_pool(padded, lengths)
    torch.testing.assert_close(pooled[0], features[0, :4].mean(dim=0))
    torch.testing.assert_close(pooled[1], features[1].mean(dim=0))


class WithEncoder(nn.Module):
    """An ESPnet-like model: the encoder gets (features, lengths)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = TwoLayers()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, lengths)


def test_a_router_hooked_to_a_module_input_routes_every_forward_on_its_features_and_lengths():
    model = WithEncoder()
    inject_adapters(model, "hdmole", target_modules=["up", "down"], **OPTIONS)
    router = attach_domain_router(model, feature_dim=8, source_module="encoder")
    with torch.no_grad():
        router.proj.weight.normal_()
    x, lengths = torch.randn(3, 5, 8), torch.tensor([5, 2, 4])
    model(x, lengths)
    expected = router.proj(masked_mean_pool(x, lengths))
    torch.testing.assert_close(routing_context(model).domain_logits, expected)
    torch.testing.assert_close(routing_context(model).domain_probs, expected.softmax(-1))
    assert "peft_adapters.default.proj.weight" in dict(model.named_parameters())


def test_a_router_hooked_to_a_module_output_routes_the_layers_after_it():
    torch.manual_seed(0)
    model = TwoLayers()
    inject_adapters(model, "hdmole", target_modules=["down"], **OPTIONS)
    router = attach_domain_router(model, feature_dim=12, source_module="up", source_side="output")
    with torch.no_grad():
        router.proj.weight.normal_()
    x = torch.randn(3, 5, 8)
    model(x)
    expected = router.proj(model.up(x).mean(dim=1))
    torch.testing.assert_close(routing_context(model).domain_logits, expected)


@pytest.mark.parametrize("source_module", ["up", "", "encoder"])
def test_a_router_on_the_output_of_a_module_holding_hdmole_layers_is_refused(source_module):
    """Those layers would run before the router, routed by the previous batch's g."""
    model = WithEncoder()
    inject_adapters(model, "hdmole", target_modules=["up", "down"], **OPTIONS)
    source = f"encoder.{source_module}" if source_module == "up" else source_module
    with pytest.raises(PeftConfigError, match=r"holds HDMoLE layers.*router_side='input'"):
        attach_domain_router(model, feature_dim=12, source_module=source, source_side="output")
    assert "peft_adapters" not in dict(model.named_children())


class MaskedAttention(nn.Module):
    """An ESPnet-like encoder block: it gets (features, (B, 1, T) padding mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = TwoLayers()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x, mask)


def test_a_router_source_with_a_padding_mask_pools_the_valid_frames_only():
    model = MaskedAttention()
    inject_adapters(model, "hdmole", target_modules=["up", "down"], **OPTIONS)
    router = attach_domain_router(model, feature_dim=8, source_module="block")
    with torch.no_grad():
        router.proj.weight.normal_()
    x, lengths = torch.randn(3, 5, 8), torch.tensor([5, 2, 4])
    model(x, (torch.arange(5)[None, :] < lengths[:, None]).unsqueeze(1))
    expected = router.proj(masked_mean_pool(x, lengths))
    torch.testing.assert_close(routing_context(model).domain_logits, expected)


class RelativeSubsampling(nn.Module):
    """Like ESPnet's Conv2dSubsampling with relative positions: returns ((x, pos_emb), mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 8)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        return (self.out(x), torch.zeros(1, 2 * x.shape[1] - 1, 8)), mask


class WithSubsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block = RelativeSubsampling(), TwoLayers()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        (h, _), mask = self.embed(x, mask)
        return self.block(h, mask)


def test_a_router_on_a_nested_output_finds_its_features_and_padding_mask():
    model = WithSubsampling()
    inject_adapters(model, "hdmole", target_modules=["up", "down"], **OPTIONS)
    router = attach_domain_router(model, feature_dim=8, source_module="embed", source_side="output")
    with torch.no_grad():
        router.proj.weight.normal_()
    x, lengths = torch.randn(3, 5, 8), torch.tensor([5, 2, 4])
    model(x, (torch.arange(5)[None, :] < lengths[:, None]).unsqueeze(1))
    expected = router.proj(masked_mean_pool(model.embed.out(x), lengths))
    torch.testing.assert_close(routing_context(model).domain_logits, expected)


def test_a_router_source_without_matching_features_is_refused():
    model = hdmole_model()
    attach_domain_router(model, feature_dim=5, source_module="up")
    with pytest.raises(ValueError, match=r"gave no \(B, T, 5\) tensor"):
        model(torch.randn(2, 3, 8))


def test_balance_loss_is_n_sum_f_p_and_one_at_perfect_balance():
    model = hdmole_model(expert_domains=[0, 1])
    model(torch.randn(2, 5, 8))
    records = [model.get_submodule(name).peft_adapters["default"].last_routing for name in ("up", "down")]
    expected = torch.stack([2 * (r.dispatch * r.expert_probs).sum() for r in records]).mean()
    torch.testing.assert_close(hdmole_aux_losses(model)["balance"], expected)
    for layer in ("up", "down"):
        router = model.get_submodule(layer).peft_adapters["default"].router
        nn.init.zeros_(router.weight)
        nn.init.zeros_(router.bias)
    model(torch.randn(2, 5, 8))
    assert hdmole_aux_losses(model)["balance"].item() == pytest.approx(1.0)


def test_domain_loss_is_cross_entropy_over_labelled_utterances():
    model = hdmole_model()
    router = attach_domain_router(model, feature_dim=8)
    with torch.no_grad():
        router.proj.weight.normal_()
    x = torch.randn(3, 5, 8)
    logits = router(x)
    model(x)
    labels = torch.tensor([1, IGNORE_DOMAIN, 0])
    losses = hdmole_aux_losses(model, labels)
    torch.testing.assert_close(losses["domain"], F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    unknown = hdmole_aux_losses(model, torch.full((3,), IGNORE_DOMAIN))["domain"]
    assert unknown.item() == 0.0


def test_domain_loss_without_a_router_output_names_the_fix():
    model = hdmole_model()
    model(torch.randn(2, 3, 8))
    with pytest.raises(RuntimeError, match="attach_domain_router"):
        hdmole_aux_losses(model, torch.tensor([0, 1]))


def test_statistics_report_active_experts_entropy_and_router_accuracy():
    model = hdmole_model()
    set_domain_probs(model, torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    x = torch.randn(3, 5, 8)
    model(x)
    stats = hdmole_statistics(model, torch.tensor([0, 0, IGNORE_DOMAIN]))
    weights = model.up.peft_adapters["default"].route(x)
    assert stats["up.active_experts"] == pytest.approx(float(weights.gt(0).sum(-1).float().mean()))
    assert 0.0 < stats["up.routing_entropy"] <= math.log(4) + 1e-6
    assert stats["active_experts"] == pytest.approx(
        (stats["up.active_experts"] + stats["down.active_experts"]) / 2
    )
    assert stats["domain_accuracy"] == pytest.approx(0.5)


def test_a_model_copies_after_a_forward_with_its_own_routing():
    model = hdmole_model(init_weights=False)
    attach_domain_router(model, feature_dim=8, source_module="up")
    x = torch.randn(2, 4, 8)
    out = model(x)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), out)
    assert routing_context(clone) is clone.peft_adapters["default"].context is not routing_context(model)


def test_training_on_two_domains_teaches_the_router_the_domain_of_held_out_utterances():
    """Domain d shifts the features by +-mu and adds its own map; CE teaches the router which."""
    generator = torch.Generator().manual_seed(7)
    shift = torch.zeros(8)
    shift[:3] = 0.6
    maps = [0.5 * torch.randn(8, 8, generator=generator) for _ in range(2)]
    torch.manual_seed(0)
    teacher = TwoLayers()

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        domains = torch.randint(0, 2, (size,), generator=generator)
        x = torch.randn(size, 6, 8, generator=generator) + (2 * domains - 1)[:, None, None] * shift
        with torch.no_grad():
            target = teacher(x) + torch.stack([x[b] @ maps[int(d)].T for b, d in enumerate(domains)])
        return x, domains, target

    model = hdmole_model(expert_domains=[0, 1, -1], rank=2)
    attach_domain_router(model, feature_dim=8, source_module="up")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    x_test, domains_test, target_test = batch(200)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            error = float(F.mse_loss(model(x_test), target_test))
        return hdmole_statistics(model, domains_test)["domain_accuracy"], error

    accuracy_before, error_before = evaluate()
    for _ in range(80):
        x, domains, target = batch(16)
        out = model(x)
        losses = hdmole_aux_losses(model, domains)
        loss = F.mse_loss(out, target) + losses["domain"] + 0.01 * losses["balance"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy_after, error_after = evaluate()

    assert accuracy_before < 0.6
    assert accuracy_after > 0.9
    assert error_after < 0.7 * error_before


def test_a_config_with_a_router_source_attaches_the_router_at_injection(tmp_path):
    model = TwoLayers()
    inject_adapters(model, "hdmole", target_modules=["up", "down"], router_source="up", **OPTIONS)
    router = domain_router(model)
    assert router is not None and router.proj.in_features == 8, "the width of the Linear it reads"
    contexts = {id(model.get_submodule(name).peft_adapters["default"].context) for name in ("up", "down")}
    assert contexts == {id(router.context)}, "one context for every layer, bound at injection"
    with torch.no_grad():
        router.proj.weight.normal_()
    x = torch.randn(2, 5, 8)
    expected = model(x)

    base = unload(copy.deepcopy(model))
    load_adapter(base, save_adapter(model, tmp_path / "adapter.pt"))
    torch.testing.assert_close(base(x), expected)
    assert domain_router(base).source_module == "up"


def test_without_a_router_source_the_layers_still_share_one_context():
    model = TwoLayers()
    inject_adapters(model, "hdmole", target_modules=["up", "down"], **OPTIONS)
    up, down = (model.get_submodule(name).peft_adapters["default"] for name in ("up", "down"))
    assert up.context is down.context is routing_context(model)
