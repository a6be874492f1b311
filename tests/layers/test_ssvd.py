"""SSVD and SSVD-O: shifts and rotations inside the top-k singular subspace of W.

    W' = W + U_k M V_k^T,   M = P_out diag(s_k + d) P_in^T - diag(s_k),
    P_in = blockdiag(R_in, I),  P_out = blockdiag(R_out, I),  R = rotation(skew(params)).

``espnet_compat`` is checked against ESPnet master's SSVDLinear, written out below: its formula,
its k = int(m * rotation_ratio) and its initialisation (gate 0, shift kaiming-uniform).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from layer_builders import SHAPES, add_adapter, make_linear, rel_err

import ssvd_peft.layers.ssvd as ssvd_module
from ssvd_peft.layers import SsvdAdapter
from ssvd_peft.layers.ssvd import prefers_merged_path
from ssvd_peft.methods.ssvd import SsvdConfig, SsvdDims, SsvdOConfig

VARIANTS = {
    "ssvd-cayley": ("ssvd", {"k": 6, "rotation": "cayley"}),
    "ssvd-neumann": ("ssvd", {"k": 6, "rotation": "neumann"}),
    "ssvd-expm": ("ssvd", {"k": 6, "rotation": "expm"}),
    "ssvd_o-cayley": ("ssvd_o", {"k": 6, "k_in": 4, "k_out": 3, "rotation": "cayley"}),
    "ssvd_o-neumann": ("ssvd_o", {"k": 6, "outer_share": 0.5, "rotation": "neumann"}),
    "ssvd_o-expm": ("ssvd_o", {"k": 6, "outer_share": 0.3, "rotation": "expm"}),
    "espnet_compat": ("ssvd", {"k": 6, "espnet_compat": True}),
}
IDENTITY_VARIANTS = [variant for variant in VARIANTS if variant != "espnet_compat"]
PATHS = ["low_rank", "merged"]
SHAPES_WITH_SQUARE = {**SHAPES, "square": (16, 16)}


def ssvd_layer(variant: str, shape: str = "tall", bias: bool = True, init_weights: bool = True):
    method, options = VARIANTS[variant]
    wrapper = add_adapter(
        make_linear(*SHAPES_WITH_SQUARE[shape], bias=bias), method, init_weights=init_weights, **options
    )
    return wrapper, wrapper.peft_adapters["default"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    """Force the forward onto one path; fails if the forward never asks which path to take."""
    calls = []

    def forced(*args, **kwargs) -> bool:
        calls.append(args)
        return request.param == "merged"

    monkeypatch.setattr(ssvd_module, "prefers_merged_path", forced)
    yield request.param
    assert calls, "SsvdAdapter.forward must choose its path with prefers_merged_path"


def skew_by_hand(params: torch.Tensor, k: int) -> torch.Tensor:
    """S[j, i] = p, S[i, j] = -p for the pairs i < j in torch.triu_indices order."""
    skew = torch.zeros(k, k, dtype=params.dtype)
    for p, (i, j) in zip(params, torch.triu_indices(k, k, offset=1).T.tolist(), strict=True):
        skew[j, i], skew[i, j] = p, -p
    return skew


def rotation_by_hand(skew: torch.Tensor, method: str, neumann_terms: int = 4) -> torch.Tensor:
    eye = torch.eye(skew.shape[0], dtype=skew.dtype)
    if method == "cayley":
        return torch.linalg.inv(eye - skew) @ (eye + skew)
    if method == "expm":
        return torch.linalg.matrix_exp(skew)
    series = sum(torch.linalg.matrix_power(skew, n) for n in range(neumann_terms + 1))
    return series @ (eye + skew)


def block_rotation(params: torch.Tensor, size: int, k: int, method: str) -> torch.Tensor:
    """P = blockdiag(R, I_{k - size})."""
    p = torch.eye(k, dtype=params.dtype)
    if size:
        p[:size, :size] = rotation_by_hand(skew_by_hand(params, size), method)
    return p


def espnet_ssvd_weight(
    weight: torch.Tensor, shift: torch.Tensor, gate: torch.Tensor, p: torch.Tensor, k: int
) -> torch.Tensor:
    """ESPnet master's SSVDLinear effective weight, in float64.

    The singular vectors' signs are LAPACK's choice in ESPnet. ssvd_peft fixes them (the largest
    entry of each output-side vector is positive); flipping the signs D of the pairs maps
    A = I + 2S to D A D, i.e. p_ij -> d_i d_j p_ij, the same family of weights with the same
    start. The reference takes ssvd_peft's signs so that the same p means the same weight.
    """
    w = weight.detach().double()
    out_features, in_features = w.shape
    tall = out_features >= in_features
    u, s, vh = torch.linalg.svd(w if tall else w.T, full_matrices=False)
    output_side = u if tall else vh.T
    signs = torch.sign(output_side.gather(0, output_side.abs().argmax(dim=0, keepdim=True)))[0]
    u, vh = u * signs, vh * signs[:, None]

    m = s.numel()
    sigma = s + F.pad(shift.detach().double() * torch.sigmoid(gate.detach().double()), (0, m - k))
    a = torch.eye(k, dtype=torch.float64)
    for value, (i, j) in zip(p.detach().double(), torch.triu_indices(k, k, 1).T.tolist(), strict=True):
        a[i, j] -= 2 * value
        a[j, i] += 2 * value
    vh_rot = torch.cat([a @ vh[:k], vh[k:]])
    adapted = u @ torch.diag(sigma) @ vh_rot
    return adapted if tall else adapted.T


@pytest.mark.parametrize("variant", IDENTITY_VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_identity_at_init(variant, shape, bias, path):
    wrapper, _ = ssvd_layer(variant, shape, bias)
    x = torch.randn(2, 5, wrapper.in_features)
    torch.testing.assert_close(wrapper(x), wrapper.base_layer(x), rtol=1e-6, atol=1e-6)
    assert float(wrapper.delta_weight().detach().abs().max()) < 1e-6


@pytest.mark.parametrize("shape", list(SHAPES_WITH_SQUARE))
@pytest.mark.parametrize("bias", [True, False])
def test_espnet_compat_equals_espnet_ssvdlinear(shape, bias, path):
    wrapper, adapter = ssvd_layer("espnet_compat", shape, bias, init_weights=False)
    base = wrapper.base_layer
    tall = base.out_features >= base.in_features
    skew_params = adapter.ssvd_inner if tall else adapter.ssvd_outer
    assert skew_params.numel() == 6 * 5 // 2
    assert (adapter.ssvd_outer if tall else adapter.ssvd_inner) is None
    assert adapter.ssvd_gate.numel() == 1 and float(adapter.ssvd_gate.detach().abs()) > 0

    expected_weight = espnet_ssvd_weight(base.weight, adapter.ssvd_shift, adapter.ssvd_gate, skew_params, 6)
    x = torch.randn(3, 4, base.in_features)
    bias_64 = None if base.bias is None else base.bias.double()
    expected = F.linear(x.double(), expected_weight, bias_64)

    assert rel_err(expected_weight, base.weight) > 1e-2, "a non-trivial adapter"
    assert rel_err(base.weight + wrapper.delta_weight(), expected_weight) < 1e-5
    assert rel_err(wrapper(x), expected) < 1e-5


@pytest.mark.parametrize("shape", list(SHAPES_WITH_SQUARE))
def test_espnet_compat_starts_where_espnet_ssvdlinear_starts(shape):
    """ESPnet's apply_svd: gate = 0, kaiming_uniform_(s[None, :]); so W' = W + U_k diag(s / 2) V_k^T."""
    wrapper, adapter = ssvd_layer("espnet_compat", shape)
    make_linear(*SHAPES_WITH_SQUARE[shape])  # seeds the generator and draws as for the layer above
    expected_shift = torch.nn.init.kaiming_uniform_(torch.empty(1, 6))[0]

    torch.testing.assert_close(adapter.ssvd_shift.detach(), expected_shift, rtol=0, atol=0)
    assert float(adapter.ssvd_shift.detach().abs().max()) <= (6 / 6) ** 0.5
    assert float(adapter.ssvd_gate.detach()) == 0.0
    base = wrapper.base_layer
    skew_params = adapter.ssvd_inner if base.out_features >= base.in_features else adapter.ssvd_outer
    assert not skew_params.detach().any()
    expected = espnet_ssvd_weight(base.weight, adapter.ssvd_shift, adapter.ssvd_gate, skew_params, 6)
    assert rel_err(base.weight + wrapper.delta_weight(), expected) < 1e-6
    assert rel_err(expected, base.weight) > 1e-3, "ESPnet's layer does not start at the base weight"


@pytest.mark.parametrize(
    ("in_features", "out_features", "k_ratio", "espnet_k"),
    [(1024, 4096, 0.4, 409), (4096, 1024, 0.4, 409), (256, 256, 0.25, 64), (20, 12, 0.3, 3)],
)
def test_espnet_compat_truncates_k_as_espnet_does(in_features, out_features, k_ratio, espnet_k):
    """ESPnet: k_trainable = int(min(in, out) * rotation_ratio); m = 1024, 0.4 -> 409 (83,846 parameters)."""
    config = SsvdConfig(target_modules=["x"], k_ratio=k_ratio, espnet_compat=True)
    assert config.dims(in_features, out_features).k == espnet_k
    split = config.trainable_split(in_features, out_features)
    assert split.total == espnet_k + 1 + espnet_k * (espnet_k - 1) // 2
    if (in_features, out_features) == (1024, 4096):
        assert split.total == 83_846


def test_espnet_compat_refuses_a_ratio_that_gives_no_subspace():
    with pytest.raises(ValueError, match=r"k = floor\(0.05 x 12\) = 0"):
        SsvdConfig(target_modules=["x"], k_ratio=0.05, espnet_compat=True).dims(20, 12)


@pytest.mark.parametrize(
    ("method", "options", "names"),
    [
        ("ssvd", {"k": 6}, {"ssvd_shift", "ssvd_inner"}),
        ("ssvd", {"k": 6, "k_in": 1}, {"ssvd_shift"}),
        ("ssvd_o", {"k": 6, "outer_share": 0.0}, {"ssvd_shift", "ssvd_inner"}),
        ("ssvd_o", {"k": 6, "outer_share": 1.0}, {"ssvd_shift", "ssvd_outer"}),
        ("ssvd", {"k": 6, "espnet_compat": True}, {"ssvd_shift", "ssvd_inner", "ssvd_gate"}),
    ],
)
def test_no_parameter_is_registered_that_the_configuration_cannot_use(method, options, names):
    """An empty rotation parameter never gets a gradient, which DistributedDataParallel refuses."""
    wrapper = add_adapter(make_linear(12, 20), method, init_weights=False, **options)
    adapter = wrapper.peft_adapters["default"]
    assert {name for name, _ in adapter.named_parameters()} == names
    wrapper(torch.randn(3, 12)).sum().backward()
    assert all(p.numel() and p.grad is not None for p in adapter.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_and_parameters_keep_float64_for_a_float64_model(dtype):
    """A float64 layer keeps float64 singular values (float32 ones cost 5e-8 relative in the delta)."""
    layer = make_linear(12, 20).to(dtype)
    wrapper = add_adapter(layer, "ssvd_o", k=6, outer_share=0.5, init_weights=False)
    adapter = wrapper.peft_adapters["default"]
    assert {t.dtype for t in (adapter.singular_U, adapter.singular_values, adapter.singular_V)} == {dtype}
    assert {p.dtype for p in adapter.parameters()} == {dtype}
    expected_core = core_by_hand(adapter, 6)
    assert adapter.core_matrix().dtype == torch.float64
    torch.testing.assert_close(adapter.core_matrix(), expected_core, rtol=1e-12, atol=1e-12)
    if dtype == torch.float64:
        u, v = adapter.singular_U, adapter.singular_V
        torch.testing.assert_close(wrapper.delta_weight(), u @ expected_core @ v.T, rtol=1e-12, atol=1e-12)


def core_by_hand(adapter: SsvdAdapter, k: int) -> torch.Tensor:
    """M = P_out diag(s + d) P_in^T - diag(s) in float64, from the adapter's stored state."""
    dims = SsvdDims(adapter.k, adapter.k_in, adapter.k_out)
    s = adapter.singular_values.double()
    d = adapter.ssvd_shift.detach().double()
    p_in = block_rotation(adapter.ssvd_inner.detach().double(), dims.k_in, k, "cayley")
    p_out = block_rotation(adapter.ssvd_outer.detach().double(), dims.k_out, k, "cayley")
    return p_out @ torch.diag(s + d) @ p_in.T - torch.diag(s)


def test_singular_buffers_are_the_top_k_triplets_with_fixed_signs():
    wrapper, adapter = ssvd_layer("ssvd-cayley", "wide")
    weight = wrapper.base_layer.weight.double()
    u, s, v = (t.double() for t in (adapter.singular_U, adapter.singular_values, adapter.singular_V))
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(s, torch.linalg.svdvals(weight)[:6], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-6)
    torch.testing.assert_close(v.T @ v, eye, rtol=0, atol=1e-6)
    torch.testing.assert_close(weight @ v, u * s, rtol=1e-5, atol=1e-5)
    largest = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    assert bool((largest > 0).all())


@pytest.mark.parametrize("rotation", ["cayley", "neumann", "expm"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_effective_weight_is_w_plus_u_m_vt(rotation, shape, path):
    wrapper = add_adapter(
        make_linear(*SHAPES[shape]), "ssvd_o", k=6, k_in=4, k_out=3, rotation=rotation, init_weights=False
    )
    adapter = wrapper.peft_adapters["default"]
    base = wrapper.base_layer
    u, s, v = (t.double() for t in (adapter.singular_U, adapter.singular_values, adapter.singular_V))
    p_in = block_rotation(adapter.ssvd_inner.detach().double(), 4, 6, rotation)
    p_out = block_rotation(adapter.ssvd_outer.detach().double(), 3, 6, rotation)
    d = adapter.ssvd_shift.detach().double()
    core = p_out @ torch.diag(s + d) @ p_in.T - torch.diag(s)
    expected_weight = base.weight.double() + u @ core @ v.T
    x = torch.randn(2, 5, base.in_features)

    assert rel_err(expected_weight, base.weight) > 1e-2, "a non-trivial adapter"
    assert rel_err(base.weight + wrapper.delta_weight(), expected_weight) < 1e-5
    assert rel_err(wrapper(x), F.linear(x.double(), expected_weight, base.bias.double())) < 1e-5


def run_on_path(variant: str, tokens: int, merged: bool, monkeypatch) -> list[torch.Tensor]:
    """Output, input gradient and adapter gradients of one forward + backward on a forced path."""
    monkeypatch.setattr(ssvd_module, "prefers_merged_path", lambda *args, **kwargs: merged)
    wrapper, adapter = ssvd_layer(variant, "wide", init_weights=False)
    x = torch.randn(tokens, wrapper.in_features, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    upstream = torch.randn(tokens, wrapper.out_features, generator=torch.Generator().manual_seed(4))
    output = wrapper(x)
    (output * upstream).sum().backward()
    return [output, x.grad, *(p.grad for p in adapter.parameters())]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tokens", [3, 40])  # fewer and more tokens than the layer's 12 outputs
def test_low_rank_and_merged_paths_agree_in_value_and_gradient(variant, tokens, monkeypatch):
    low_rank = run_on_path(variant, tokens, False, monkeypatch)
    merged = run_on_path(variant, tokens, True, monkeypatch)
    for from_low_rank, from_merged in zip(low_rank, merged, strict=True):
        torch.testing.assert_close(from_low_rank, from_merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [3, 40])  # fewer and more tokens than the layer's 12 outputs
def test_gradients_equal_autograd_through_the_effective_weight(tokens, path):
    wrapper, adapter = ssvd_layer("ssvd_o-cayley", "wide", init_weights=False)
    base = wrapper.base_layer
    x = torch.randn(tokens, base.in_features, requires_grad=True)
    upstream = torch.randn(tokens, base.out_features)
    params = list(adapter.parameters())

    ours = torch.autograd.grad((wrapper(x) * upstream).sum(), [x, *params])
    reference_out = F.linear(x, base.weight + wrapper.delta_weight(), base.bias)
    reference = torch.autograd.grad((reference_out * upstream).sum(), [x, *params])

    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_path_choice_depends_on_the_token_count(training):
    in_features = out_features = 1024
    assert not prefers_merged_path(8, in_features, out_features, 400, training)
    assert prefers_merged_path(100_000, in_features, out_features, 400, training)


def largest_rotation(share: Fraction, budget: int, k: int) -> int:
    """The largest j <= k with j (j - 1) / 2 <= share * budget; a 1 x 1 rotation counts as none."""
    fits = [j for j in range(2, k + 1) if Fraction(j * (j - 1), 2) <= share * budget]
    return max(fits, default=0)


def test_ssvd_o_with_no_outer_share_is_ssvd():
    dims = SsvdOConfig(target_modules=["x"], k=8, outer_share=0.0).dims(20, 30)
    assert (dims.k, dims.k_in, dims.k_out) == (8, 8, 0)
    same_as_ssvd = SsvdConfig(target_modules=["x"], k=8).trainable_split(20, 30)
    assert SsvdOConfig(target_modules=["x"], k=8, outer_share=0.0).trainable_split(20, 30) == same_as_ssvd


@pytest.mark.parametrize("k", [6, 10, 16])
@pytest.mark.parametrize("outer_share", ["1/4", "1/2", "7/10", "1"])
@pytest.mark.parametrize("rotation_budget", [None, 12, 40])
def test_ssvd_o_splits_the_rotation_budget(k, outer_share, rotation_budget):
    share = Fraction(outer_share)
    config = SsvdOConfig(target_modules=["x"], k=k, outer_share=float(share), rotation_budget=rotation_budget)
    budget = k * (k - 1) // 2 if rotation_budget is None else rotation_budget
    dims = config.dims(32, 24)

    assert dims.k_in * (dims.k_in - 1) // 2 + dims.k_out * (dims.k_out - 1) // 2 <= budget
    assert dims.k_out == largest_rotation(share, budget, k), "k_out: the largest rotation its share fits"
    assert dims.k_in == largest_rotation(1 - share, budget, k), "k_in: the largest rotation its share fits"


def test_ssvd_o_split_is_exact_at_share_boundaries():
    """k = 6, outer_share 0.8: the inner share is 0.2 * 15 = 3 = 3 * 2 / 2, room for k_in = 3."""
    dims = SsvdOConfig(target_modules=["x"], k=6, outer_share=0.8).dims(32, 24)
    assert (dims.k_in, dims.k_out) == (3, 5), (
        "the budget split must not lose a rotation to float rounding: (1 - 0.8) * 15 < 3 in floats"
    )


def test_ssvd_o_honours_explicit_rotation_sizes():
    config = SsvdOConfig(target_modules=["x"], k=10, k_in=3, k_out=7, outer_share=0.1)
    assert config.dims(32, 24) == SsvdDims(k=10, k_in=3, k_out=7)
    wrapper = add_adapter(make_linear(32, 24), "ssvd_o", k=10, k_in=3, k_out=7)
    adapter = wrapper.peft_adapters["default"]
    assert (adapter.ssvd_inner.numel(), adapter.ssvd_outer.numel()) == (3, 21)


@pytest.mark.parametrize(
    ("method", "options", "in_features", "out_features", "formula"),
    [
        ("ssvd", {"k": 5}, 12, 20, 5 + 5 * 4 // 2),
        ("ssvd", {"k": 5, "k_in": 3}, 20, 12, 5 + 3),
        ("ssvd", {"k_ratio": 0.5}, 12, 20, 6 + 6 * 5 // 2),
        ("ssvd", {"k": 5, "espnet_compat": True}, 12, 20, 5 + 1 + 5 * 4 // 2),
        ("ssvd", {"k": 5, "espnet_compat": True}, 20, 12, 5 + 1 + 5 * 4 // 2),
        ("ssvd_o", {"k": 8, "k_in": 5, "k_out": 4}, 12, 20, 8 + 5 * 4 // 2 + 4 * 3 // 2),
        ("ssvd_o", {"k": 8, "outer_share": 0.5}, 20, 12, 8 + 5 * 4 // 2 + 5 * 4 // 2),
    ],
)
def test_parameter_count_equals_the_closed_formula(method, options, in_features, out_features, formula):
    config_class = SsvdOConfig if method == "ssvd_o" else SsvdConfig
    split = config_class(target_modules=["x"], **options).trainable_split(in_features, out_features)
    wrapper = add_adapter(make_linear(in_features, out_features), method, **options)
    counted = sum(p.numel() for p in wrapper.peft_adapters["default"].parameters())
    assert counted == split.total == formula


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_adapter_parameters_get_gradients_and_change(variant, path):
    wrapper, adapter = ssvd_layer(variant, "tall", init_weights=False)
    frozen = {name: t.detach().clone() for name, t in [*wrapper.named_parameters(), *wrapper.named_buffers()]}
    trainable = {f"peft_adapters.default.{name}" for name, _ in adapter.named_parameters()}
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)

    wrapper(torch.randn(2, 5, wrapper.in_features)).pow(2).mean().backward()
    assert wrapper.base_layer.weight.grad is None and wrapper.base_layer.bias.grad is None
    for name in trainable:
        assert float(wrapper.get_parameter(name).grad.abs().sum()) > 0, name
    optimizer.step()

    after = dict([*wrapper.named_parameters(), *wrapper.named_buffers()])
    for name, before in frozen.items():
        changed = not torch.equal(after[name], before)
        assert changed == (name in trainable), name


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(
        ValueError, match=r"k = 13 is larger than this layer allows \(min\(in=12, out=20\) = 12\)"
    ):
        add_adapter(make_linear(12, 20), "ssvd", k=13)
    with pytest.raises(ValueError, match=r"k = 13 is larger than this layer allows"):
        add_adapter(make_linear(20, 12), "ssvd_o", k=13)
    with pytest.raises(ValueError, match=r"k_in = 7 exceeds the subspace size k = 6"):
        add_adapter(make_linear(12, 20), "ssvd", k=6, k_in=7)
    with pytest.raises(ValueError, match=r"k_out = 7 exceeds the subspace size k = 6"):
        add_adapter(make_linear(12, 20), "ssvd_o", k=6, k_out=7)


def test_default_k_is_the_ratio_of_the_smaller_side():
    dims = SsvdConfig(target_modules=["x"], k_ratio=0.4).dims(100, 30)
    assert dims.k == round(0.4 * 30) == dims.k_in


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_svd_runs_after_construction(variant, path, monkeypatch):
    wrapper, adapter = ssvd_layer(variant, "wide", init_weights=False)

    def refuse(*args, **kwargs):
        raise AssertionError("an SVD ran after construction")

    for module, name in [
        (torch.linalg, "svd"),
        (torch.linalg, "svdvals"),
        (torch, "svd"),
        (torch, "svd_lowrank"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    x = torch.randn(3, 4, wrapper.in_features, requires_grad=True)
    wrapper(x).sum().backward()
    assert x.grad is not None and adapter.ssvd_shift.grad is not None
    wrapper.merge()
    wrapper.unmerge()


def test_unfrozen_base_gets_the_dense_gradient(path):
    wrapper, _ = ssvd_layer("ssvd_o-cayley", "tall", init_weights=False)
    base = wrapper.base_layer
    base.requires_grad_(True)
    x = torch.randn(7, base.in_features)
    upstream = torch.randn(7, base.out_features)

    (wrapper(x) * upstream).sum().backward()

    torch.testing.assert_close(base.weight.grad, upstream.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.bias.grad, upstream.sum(0), rtol=1e-5, atol=1e-5)
