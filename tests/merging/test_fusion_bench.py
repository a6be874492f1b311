"""Our merge methods against FusionBench's (PyPI ``fusion-bench``), an independent implementation.

Runs only where ``fusion_bench`` is importable (a separate environment: ``.venv-fusion``); skipped
elsewhere. FusionBench is called, never copied: its low-level functions on tensors and state dicts
(no Hydra configs, no downloads). Two algorithms are run whole, on an in-memory pool of ``nn.Linear``
modules: Model Stock, whose N-model formula lives only in ``ModelStock.run``, and Task Arithmetic,
whose module-level ``task_arithmetic_merge`` fails in fusion-bench 0.2.33 on any module (it adds
state dicts of Parameters and Tensors, which its strict type check refuses). Inputs: a 48 x 32 base and
fine-tunes base + tau_t, in float64 so that an identical algorithm agrees to ~1e-13.

Conventions that differ, and how each comparison bridges them:

- Scaling: FusionBench's tensor functions return the merged task vector; its algorithms add
  ``scaling_factor`` (or TSV-M's ``alpha``) times it to the base, which the tests do here too.
- TIES trim: ``topk_values_mask(M, K)`` keeps the entries >= the (n - int(n K))-th smallest |tau|,
  that is int(n K) + 1 entries per task (the original TIES code's off-by-one; K > 1 is read as a
  percentage, K = 1 fails); ours keeps round(density n). Bridged: density = (int(n K) + 1) / n.
- TIES disjoint merge: FusionBench's algorithm defaults to ``merge_func: sum``; ours is the disjoint
  mean (``merge_func="mean"``), which is what the tests ask FusionBench for.
- TIES scope: ``TiesMergingAlgorithm`` flattens the whole model into one vector (one global top-k
  and one fallback sign); ours trims and elects per tensor. Compared per tensor (a one-tensor vector).
- TIES zero-sum sign: where sum_t trimmed_t = 0 but some trimmed_t != 0, FusionBench elects
  sign(sum of the elected signs) (a count of entries), ours sign(sum of all trimmed values) (a mass).
  Not bridgeable by a knob; ``test_ties_sign_of_a_zero_sum_entry_is_a_documented_difference``
  pins both rules.
- DARE: FusionBench draws ``torch.rand_like`` from the global generator and keeps r > p; ours draws
  ``torch.rand`` from the merge's generator and keeps r >= p (differs only where r == p exactly).
  With the global generator and ours seeded alike, the draws are the same numbers in the same order
  (task by task), so the masks are shared and the results compared exactly.
- Non-2-D tensors in subspace methods (Iso-C, Iso-CTS, TSV-M): both take the mean of the task vectors,
  but FusionBench then scales it by ``scaling_factor``/``alpha`` and ours does not (the engine's
  tensor rule: theta_0 + mean tau). Equal at scaling 1; pinned at 0.5 by the state-dict tests.
- Spectra: FusionBench counts min(out, in) singular values; ours the numerically non-zero ones (the
  rank r). Same for full-rank task vectors. For low-rank ones: Iso-C's flat value is mean(s) over
  min(out, in) there (and FusionBench also adds the null directions, arbitrary singular vectors, at that
  value): bridged by comparing inside the column/row spaces of sum tau and scaling ours by
  r / min(out, in). TSV-M keeps int(min(out, in) / T) triplets per task there, floor(r_t keep) here
  (keep default 1 / T): bridged by keep = int(min(out, in) / T) / r_t, when that many are non-zero.
- Iso-CTS common dimension: FusionBench k_c = min - round((min - int(min f)) / T) T; ours
  k_c = round(r f) lowered until T divides r - k_c. Bridged: ours gets common_fraction = k_c / r with
  FusionBench's k_c (``fusion_bench_common_dims``).
- Model Stock with N > 2 models: FusionBench averages the pairwise angles (in degrees) and uses
  cos(mean angle); ours averages the pairwise cosines. Equal when all pairwise angles are equal; for
  unequal angles both results lie on the line theta_0 + t (mean theta_t - theta_0) and differ only in
  t, each pinned by ``test_model_stock_of_three_unequal_angles_differs_only_in_the_angle_average``.
  FusionBench also computes the cosine in float32 with eps 1e-8 (agreement to ~1e-7) and refuses
  a single model.

This comparison found one bug in our code, since fixed: Iso-CTS with two or more tasks projected
the later tasks' residuals out of the first task's directions instead of the common subspace.
"""

import pytest

fusion_bench = pytest.importorskip("fusion_bench")

import math  # noqa: E402

import torch  # noqa: E402
from fusion_bench.method.dare.utils import param_random_drop_  # noqa: E402
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: E402
from fusion_bench.method.model_stock.model_stock import (  # noqa: E402
    ModelStock,
    compute_angle,
    compute_ratio,
    merge_weights,
)
from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (  # noqa: E402
    compute_and_sum_svd_mem_reduction,
)
from fusion_bench.method.ties_merging.ties_merging_utils import (  # noqa: E402
    ties_merging,
    topk_values_mask,
)
from fusion_bench.modelpool import BaseModelPool  # noqa: E402
from torch import nn  # noqa: E402

from ssvd_peft.merging import get_merge_method, merge_models  # noqa: E402
from ssvd_peft.merging.ops import dare  # noqa: E402

DTYPE = torch.float64
OUT, IN = 48, 32
EXACT = {"rtol": 1e-10, "atol": 1e-12}


def ours(name, base, tensors, seed=0, **knobs):
    """Our method as the engine calls it: the models stacked, weights 1."""
    method = get_merge_method(name)
    return method.function(
        base.clone(),
        torch.stack(tensors),
        torch.ones(len(tensors), dtype=base.dtype),
        generator=torch.Generator().manual_seed(seed),
        **method.resolved_knobs(knobs),
    )


def gaussian(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


def random_models(seed=0, tasks=3, scale=0.02):
    """base (48 x 32) and base + small i.i.d. Gaussian task vectors."""
    g = torch.Generator().manual_seed(seed)
    base = gaussian(g, OUT, IN)
    return base, [base + scale * gaussian(g, OUT, IN) for _ in range(tasks)]


def structured_models(seed=0, tasks=3):
    """Task vectors with a spectrum: a shared rank-4 part, a task's own rank-6 part and small full-rank
    noise (so every task vector, and their sum, has full numerical rank)."""
    g = torch.Generator().manual_seed(seed)
    base = gaussian(g, OUT, IN)
    shared = gaussian(g, OUT, 4) @ gaussian(g, 4, IN)
    taus = [
        0.05 * shared + 0.05 * gaussian(g, OUT, 6) @ gaussian(g, 6, IN) + 0.005 * gaussian(g, OUT, IN)
        for _ in range(tasks)
    ]
    return base, [base + tau for tau in taus]


def low_rank_models(rank, seed=0, tasks=3):
    """Task vectors of exact rank ``rank`` (adapter-like updates)."""
    g = torch.Generator().manual_seed(seed)
    base = gaussian(g, OUT, IN)
    return base, [base + 0.05 * gaussian(g, OUT, rank) @ gaussian(g, rank, IN) for _ in range(tasks)]


def task_vectors(base, tensors):
    return [t - base for t in tensors]


def one_key(taus, key="w"):
    return [{key: tau.clone()} for tau in taus]


def linear(weight, bias=None):
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(DTYPE)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def with_bias(seed, tensors, base):
    """State dicts {weight, bias} whose 1-D bias is fine-tuned too."""
    g = torch.Generator().manual_seed(seed + 100)
    base_bias = gaussian(g, OUT)
    biases = [base_bias + 0.02 * gaussian(g, OUT) for _ in tensors]
    base_sd = {"layer.weight": base, "layer.bias": base_bias}
    sds = [{"layer.weight": t, "layer.bias": b} for t, b in zip(tensors, biases, strict=True)]
    return base_sd, sds


# ---------------------------------------------------------------- Task Arithmetic


@pytest.mark.parametrize("scaling", [1.0, 0.3])
def test_task_arithmetic_matches_on_modules_and_per_tensor(scaling):
    base, tensors = random_models(seed=1)
    base_sd, sds = with_bias(1, tensors, base)
    pool = {"_pretrained_": linear(base_sd["layer.weight"], base_sd["layer.bias"])}
    pool |= {f"model_{i}": linear(sd["layer.weight"], sd["layer.bias"]) for i, sd in enumerate(sds)}
    merged = TaskArithmeticAlgorithm(scaling_factor=scaling).run(pool)

    torch.testing.assert_close(
        ours("task_arithmetic", base, tensors, scaling=scaling), merged.weight.data, **EXACT
    )
    engine = merge_models(base_sd, sds, "task_arithmetic", scaling=scaling)
    torch.testing.assert_close(engine["layer.weight"], merged.weight.data, **EXACT)
    torch.testing.assert_close(engine["layer.bias"], merged.bias.data, **EXACT)


# ---------------------------------------------------------------- TIES


def fusion_bench_ties(base, tensors, threshold, scaling):
    """FusionBench's TIES on one tensor: ties_merging over the flattened task vectors, disjoint mean."""
    flat = torch.stack([tau.flatten() for tau in task_vectors(base, tensors)])
    merged = ties_merging(flat, reset_thresh=threshold, merge_func="mean")
    return base + scaling * merged.reshape(base.shape)


def bridged_density(numel, threshold):
    """Our density that keeps as many entries as FusionBench's top-k at ``threshold`` (int(n K) + 1)."""
    return (int(numel * threshold) + 1) / numel


@pytest.mark.parametrize(("threshold", "scaling"), [(0.2, 1.0), (0.5, 0.7), (0.05, 1.0)])
def test_ties_matches_per_tensor_with_the_bridged_density(threshold, scaling):
    base, tensors = random_models(seed=2)
    numel = base.numel()
    _, kept, _ = topk_values_mask(
        torch.stack([tau.flatten() for tau in task_vectors(base, tensors)]), K=threshold, return_mask=True
    )
    torch.testing.assert_close(kept, torch.full_like(kept, (int(numel * threshold) + 1) / numel))

    expected = fusion_bench_ties(base, tensors, threshold, scaling)
    merged = ours("ties", base, tensors, density=bridged_density(numel, threshold), scaling=scaling)
    torch.testing.assert_close(merged, expected, **EXACT)


def test_ties_sign_of_a_zero_sum_entry_is_a_documented_difference():
    """Entry 0 sums to 0 (+2, -2, 0). More entries elect + than - (so FusionBench's fallback is +),
    but the total mass is negative (so ours is -). Every other entry agrees."""
    taus = torch.tensor(
        [
            [2.0, 1.0, 1.0, -10.0, 1.0],
            [-2.0, 1.0, 1.0, -10.0, 0.0],
            [0.0, 1.0, 1.0, -10.0, 0.0],
        ],
        dtype=DTYPE,
    )
    base = torch.zeros(5, dtype=DTYPE)
    tensors = list(taus)
    keep_all = (taus.shape[1] - 0.5) / taus.shape[1]  # int(n K) + 1 = n: FusionBench keeps every entry
    theirs = fusion_bench_ties(base, tensors, keep_all, 1.0)
    mine = ours("ties", base, tensors, density=1.0)
    assert float(theirs[0]) == 2.0  # elected +: the mean of the positive values
    assert float(mine[0]) == -2.0  # elected -: the mean of the negative values
    torch.testing.assert_close(mine[1:], theirs[1:], **EXACT)


# ---------------------------------------------------------------- DARE


def fusion_bench_dropped(taus, drop, seed):
    """FusionBench's DARE (drop and rescale) of each task vector in turn, from the global generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dropped = [tau.clone() for tau in taus]
        for tau in dropped:
            param_random_drop_(tau, drop, rescale=True)
    return dropped


@pytest.mark.parametrize("drop", [0.3, 0.9])
def test_dare_masks_are_shared_under_one_seed_and_match_exactly(drop):
    base, tensors = random_models(seed=3)
    taus = task_vectors(base, tensors)
    theirs = fusion_bench_dropped(taus, drop, seed=7)
    generator = torch.Generator().manual_seed(7)
    mine = [dare(tau.clone(), drop, generator) for tau in taus]
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(a, b, **EXACT)

    # DARE + Task Arithmetic (DareTaskArithmetic: sum, scale, add)
    expected = base + 0.4 * torch.stack(theirs).sum(0)
    torch.testing.assert_close(
        ours("task_arithmetic", base, tensors, seed=7, dare_drop=drop, scaling=0.4), expected, **EXACT
    )


def test_dare_then_ties_matches_exactly():
    """DareTiesMerging's order: DARE each task vector, then TIES on the dropped ones."""
    base, tensors = random_models(seed=4)
    drop, threshold = 0.5, 0.2
    dropped = fusion_bench_dropped(task_vectors(base, tensors), drop, seed=11)
    expected = fusion_bench_ties(base, [base + d for d in dropped], threshold, 0.5)
    merged = ours(
        "ties",
        base,
        tensors,
        seed=11,
        dare_drop=drop,
        density=bridged_density(base.numel(), threshold),
        scaling=0.5,
    )
    torch.testing.assert_close(merged, expected, **EXACT)


def test_dare_statistics_agree_under_independent_seeds():
    """Independent draws: both keep a fraction 1 - p (within 5 binomial sigmas) and rescale the kept
    entries by 1 / (1 - p); averaged over draws both are unbiased estimates of tau."""
    base, tensors = random_models(seed=5)
    tau = tensors[0] - base
    drop, draws = 0.6, 200
    theirs = torch.stack(fusion_bench_dropped([tau] * draws, drop, seed=1))
    generator = torch.Generator().manual_seed(2)
    mine = torch.stack([dare(tau.clone(), drop, generator) for _ in range(draws)])
    n = theirs.numel()
    sigma = math.sqrt(drop * (1 - drop) / n)
    for sample in (theirs, mine):
        kept = sample != 0
        assert abs(float(kept.double().mean()) - (1 - drop)) < 5 * sigma
        torch.testing.assert_close(sample[kept], (tau / (1 - drop)).expand_as(sample)[kept], **EXACT)
        # the mean over draws: per entry tau * Binomial(draws, 1-p) / (draws (1-p)), std ~ |tau| 0.087
        error = (sample.mean(0) - tau) / tau.abs()
        assert float(error.abs().mean()) < 0.1
    assert abs(float((theirs != 0).double().mean() - (mine != 0).double().mean())) < 7 * sigma


# ---------------------------------------------------------------- Iso-C


@pytest.mark.parametrize("models", [random_models, structured_models])
@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_iso_c_matches_on_full_rank_task_vectors(models, scaling):
    base, tensors = models(seed=6)
    merged_tv = iso_c(one_key(task_vectors(base, tensors)), accelerator="cpu")["w"]
    torch.testing.assert_close(
        ours("iso_c", base, tensors, scaling=scaling), base + scaling * merged_tv, **EXACT
    )


def test_iso_c_on_low_rank_task_vectors_matches_inside_their_span():
    """Rank-4 task vectors: sum of rank 12 < 32. FusionBench flattens all 32 singular values to the
    mean over 32 (20 of them zero) and so also adds 20 arbitrary null directions; inside the column
    and row spaces of the sum it is ours scaled by 12 / 32."""
    base, tensors = low_rank_models(rank=4, seed=7)
    taus = task_vectors(base, tensors)
    theirs = iso_c(one_key(taus), accelerator="cpu")["w"]
    mine = ours("iso_c", base, tensors) - base
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    rank = 12
    assert float(s[rank - 1]) > 1e-6 * float(s[0]) > float(s[rank])
    left, right = u[:, :rank], vh[:rank]
    inside = left @ (left.T @ theirs @ right.T) @ right
    torch.testing.assert_close(inside, mine * rank / min(OUT, IN), **EXACT)
    torch.testing.assert_close(left @ (left.T @ mine @ right.T) @ right, mine, **EXACT)


# ---------------------------------------------------------------- Iso-CTS


def fusion_bench_common_dims(smaller_side, tasks, fraction):
    """FusionBench's common-space size k_c (``iso_cts``'s convention, see the module docstring)."""
    specific = round((smaller_side - int(smaller_side * fraction)) / tasks) * tasks
    return smaller_side - specific


def iso_cts_case(tasks, fraction, models=structured_models):
    base, tensors = models(seed=8, tasks=tasks)
    taus = one_key(task_vectors(base, tensors))
    theirs = base + iso_cts(taus, common_space_fraction=fraction, accelerator="cpu")["w"]
    rank = min(OUT, IN)  # full-rank sums: our r is min(out, in) too
    common = fusion_bench_common_dims(rank, tasks, fraction)
    mine = ours("iso_cts", base, tensors, common_fraction=common / rank)
    return mine, theirs


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_of_one_task_matches_with_the_bridged_common_fraction(fraction):
    mine, theirs = iso_cts_case(1, fraction)
    torch.testing.assert_close(mine, theirs, **EXACT)


@pytest.mark.parametrize(
    ("tasks", "fraction", "models"),
    [(2, 0.8, structured_models), (3, 0.8, structured_models), (3, 0.5, random_models)],
)
def test_iso_cts_of_several_tasks_matches_with_the_bridged_common_fraction(tasks, fraction, models):
    mine, theirs = iso_cts_case(tasks, fraction, models)
    torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-10)


def test_iso_cts_common_dimension_conventions_differ_only_where_documented():
    """For 32 singular values and 3 tasks: f = 0.8 gives k_c = 26 either way; f = 0.5 gives
    FusionBench 17 (5 per task), ours round(16) lowered to 14 (6 per task) unless bridged."""
    assert fusion_bench_common_dims(32, 3, 0.8) == 26
    assert fusion_bench_common_dims(32, 3, 0.5) == 17


# ---------------------------------------------------------------- TSV-M


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("models", [random_models, structured_models])
def test_tsv_m_matches_on_full_rank_task_vectors(models, tasks):
    base, tensors = models(seed=9, tasks=tasks)
    theirs = compute_and_sum_svd_mem_reduction(one_key(task_vectors(base, tensors)), accelerator="cpu")["w"]
    torch.testing.assert_close(ours("tsv_m", base, tensors), base + theirs, **EXACT)
    torch.testing.assert_close(ours("tsv_m", base, tensors, scaling=0.6), base + 0.6 * theirs, **EXACT)


def test_tsv_m_on_low_rank_task_vectors_matches_with_the_bridged_keep():
    """Rank-16 task vectors, 3 tasks: FusionBench keeps int(32 / 3) = 10 triplets of each (all
    non-zero), ours floor(16 / 3) = 5 by default; keep = 10 / 16 keeps the same 10."""
    base, tensors = low_rank_models(rank=16, seed=10)
    theirs = compute_and_sum_svd_mem_reduction(one_key(task_vectors(base, tensors)), accelerator="cpu")["w"]
    torch.testing.assert_close(ours("tsv_m", base, tensors, keep=10 / 16), base + theirs, **EXACT)
    assert (ours("tsv_m", base, tensors) - base - theirs).abs().max() > 1e-3


# ---------------------------------------------------------------- whole state dicts (subspace methods)


@pytest.mark.parametrize("scaling", [1.0, 0.5])
@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
def test_state_dicts_with_a_bias_match_and_the_bias_rule_is_pinned(method, scaling):
    base, tensors = structured_models(seed=12)
    base_sd, sds = with_bias(12, tensors, base)
    taus = [{key: sd[key] - base_sd[key] for key in base_sd} for sd in sds]
    if method == "iso_c":
        merged_tv = iso_c(taus, accelerator="cpu")
    else:
        merged_tv = compute_and_sum_svd_mem_reduction(taus, accelerator="cpu")
    engine = merge_models(base_sd, sds, method, scaling=scaling)
    torch.testing.assert_close(
        engine["layer.weight"], base_sd["layer.weight"] + scaling * merged_tv["layer.weight"], **EXACT
    )
    # the bias: both take the mean task vector; FusionBench scales it, ours does not
    mean_tau = torch.stack([tau["layer.bias"] for tau in taus]).mean(0)
    torch.testing.assert_close(merged_tv["layer.bias"], mean_tau, **EXACT)
    torch.testing.assert_close(engine["layer.bias"], base_sd["layer.bias"] + mean_tau, **EXACT)


# ---------------------------------------------------------------- Model Stock

MODEL_STOCK_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}  # FusionBench's cosine is in float32


def model_stock_run(base, tensors):
    pool = BaseModelPool(
        {"_pretrained_": linear(base), **{f"model_{i}": linear(t) for i, t in enumerate(tensors)}}
    )
    return ModelStock(ignore_keys=[]).run(pool).weight.detach().clone()


def orthonormal_directions(seed, count):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(gaussian(g, OUT * IN, count))
    return [q[:, i].reshape(OUT, IN) for i in range(count)]


def test_model_stock_of_two_models_matches():
    base, tensors = structured_models(seed=13, tasks=2)
    weights = [{"weight": t} for t in (*tensors, base)]
    ratio = compute_ratio(compute_angle(*weights), k=2)
    expected = merge_weights(*weights, ratio)["weight"]
    assert 0.2 < ratio["weight"] < 1.0
    torch.testing.assert_close(ours("model_stock", base, tensors), expected, **MODEL_STOCK_TOLERANCE)
    torch.testing.assert_close(
        merge_models({"weight": base}, [{"weight": t} for t in tensors], "model_stock")["weight"],
        expected,
        **MODEL_STOCK_TOLERANCE,
    )


def test_model_stock_of_three_models_at_equal_angles_matches():
    """tau_t = 3 c + 2 e_t (c, e_t orthonormal): every pairwise cosine is 9 / 13."""
    g = torch.Generator().manual_seed(14)
    base = gaussian(g, OUT, IN)
    c, *es = orthonormal_directions(14, 4)
    tensors = [base + 3.0 * c + 2.0 * e for e in es]
    expected = model_stock_run(base, tensors)
    t = 3 * (9 / 13) / (1 + 2 * (9 / 13))
    mean = torch.stack(tensors).mean(0)
    torch.testing.assert_close(expected, t * mean + (1 - t) * base, **MODEL_STOCK_TOLERANCE)
    torch.testing.assert_close(ours("model_stock", base, tensors), expected, **MODEL_STOCK_TOLERANCE)


def test_model_stock_of_three_unequal_angles_differs_only_in_the_angle_average():
    """Two near-parallel task vectors and a near-orthogonal third: the mean cosine and the cosine of
    the mean angle differ. Each result is theta_0 + t (mean theta_t - theta_0); ours has t from the
    mean of FusionBench's own pairwise cosines, FusionBench from the mean of its pairwise angles."""
    g = torch.Generator().manual_seed(15)
    base = gaussian(g, OUT, IN)
    c, e1, e2, e3 = orthonormal_directions(15, 4)
    tensors = [base + c + 0.2 * e1, base + c + 0.3 * e2, base + 0.2 * c + e3]
    theirs, mine = model_stock_run(base, tensors), ours("model_stock", base, tensors)

    sd = [{"weight": t} for t in tensors]
    pairs = [(0, 1), (0, 2), (1, 2)]
    cosines = [compute_angle(sd[i], sd[j], {"weight": base}, return_cos=True)["weight"] for i, j in pairs]
    angles = [compute_angle(sd[i], sd[j], {"weight": base})["weight"] for i, j in pairs]
    t_ours = compute_ratio({"w": math.degrees(math.acos(sum(cosines) / 3))}, k=3)["w"]
    t_theirs = compute_ratio({"w": sum(angles) / 3}, k=3)["w"]
    assert abs(t_ours - t_theirs) > 0.05

    direction = torch.stack(tensors).mean(0) - base
    for merged, t in ((mine, t_ours), (theirs, t_theirs)):
        torch.testing.assert_close(merged, base + float(t) * direction, **MODEL_STOCK_TOLERANCE)
