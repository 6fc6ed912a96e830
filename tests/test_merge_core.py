"""Core-space merging: the bases are lossless, and each spectral method has its paper's property.

Every core-space method is also compared with the same rule applied to the dense [out, in]
updates, which it never forms itself.
"""

from __future__ import annotations

import pytest
import torch
from test_merge import flat_adapter, random_adapter

from rankwise.errors import RankwiseError
from rankwise.merge import merge_adapters
from rankwise.merge.api import contributions
from rankwise.merge.core import core_space, polar
from rankwise.merge.knots import aligned

Q = "model.layers.0.self_attn.q_proj"


def dense(adapters, weights=None) -> dict[str, list[torch.Tensor]]:
    """Each module's weighted dense updates, float64."""
    weights = weights or [1.0] * len(adapters)
    out: dict[str, list[torch.Tensor]] = {}
    for w, adapter in zip(weights, adapters, strict=True):
        for module in adapter.factors:
            out.setdefault(module, []).append(w * adapter.delta(module).double())
    return out


def spectrum(m: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(m.double())
    return s[s > 1e-5 * s[0]]  # float32 factors: the rest is rounding


def test_core_space_is_lossless_and_small():
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=2), random_adapter(3, rank=3)]
    for module, parts in contributions(adapters, [0.5, -1.0, 2.0]).items():
        space = core_space(parts)
        p, q = space.u_b.shape[1], space.v_a.shape[1]
        assert p <= 9 and q <= 9 and space.cores.shape == (3, p, q)
        assert torch.allclose(space.u_b.T @ space.u_b, torch.eye(p).double(), atol=1e-10)
        assert torch.allclose(space.v_a.T @ space.v_a, torch.eye(q).double(), atol=1e-10)
        for part, core in zip(parts, space.cores, strict=True):
            assert torch.allclose(space.update(core), part.delta().double(), atol=1e-6), module


def test_core_space_bases_drop_repeated_directions():
    adapter = random_adapter(4, rank=3)
    space = core_space(contributions([adapter, adapter], [1.0, 1.0])[Q])
    assert space.u_b.shape[1] == 3 and space.v_a.shape[1] == 3  # not 6: the same subspace


def tsv_dense(deltas: list[torch.Tensor], keep: int) -> torch.Tensor:
    """TSV-M on dense updates: top ``keep`` triplets each, orthogonalised stacks, recombined."""
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    u = torch.cat([s[0][:, :keep] for s in svds], dim=1)
    sigma = torch.cat([s[1][:keep] for s in svds])
    vh = torch.cat([s[2][:keep] for s in svds], dim=0)
    return (polar(u) * sigma) @ polar(vh.T).T


def test_tsv_equals_tsv_on_dense_updates_and_keeps_each_tasks_singular_values():
    adapters = [random_adapter(5), random_adapter(6), random_adapter(7)]  # rank 4 each
    merged, _ = merge_adapters(adapters, method="tsv", rank=12)
    for module, deltas in dense(adapters).items():
        expected = tsv_dense(deltas, keep=4)  # the core is 12 wide: 12 / 3 tasks = 4 each
        assert torch.allclose(merged.delta(module).double(), expected, atol=1e-5), module
        # orthogonalised factors: the merged singular values are exactly the tasks' own
        own = torch.cat([spectrum(d)[:4] for d in deltas]).sort(descending=True).values
        assert torch.allclose(spectrum(merged.delta(module)), own, atol=1e-5)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_sum():
    a, b = flat_adapter(8), flat_adapter(9)
    for module, (a_a, b_a) in a.factors.items():  # make b's subspaces orthogonal to a's
        a_b, b_b = b.factors[module]
        a_b = a_b - (a_b @ a_a.T) @ a_a  # a_a has orthonormal rows
        b_b = b_b - b_a @ torch.linalg.pinv(b_a) @ b_b
        b.factors[module] = (a_b, b_b)
    tsv = merge_adapters([a, b], method="tsv", rank=8).weights
    for module, deltas in dense([a, b]).items():
        assert torch.allclose(tsv.delta(module).double(), sum(deltas), atol=1e-5), module


def test_iso_c_flattens_the_nonzero_spectrum_of_the_sum_and_stays_low_rank():
    adapters = [random_adapter(10, rank=3), random_adapter(11, rank=2)]
    merged, _ = merge_adapters(adapters, method="iso_c", weights=[1.0, 0.5], rank=5)
    for module, deltas in dense(adapters, [1.0, 0.5]).items():
        total = spectrum(sum(deltas))  # rank 5: the sum of two updates of rank 3 and 2
        got = spectrum(merged.delta(module))
        assert got.numel() == total.numel() == 5
        assert torch.allclose(got, torch.full_like(got, float(total.mean())), atol=1e-5)
        # the same directions: iso_c's update lies in the sum's row and column spaces
        u, _, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
        expected = float(total.mean()) * u[:, :5] @ vh[:5]
        assert torch.allclose(merged.delta(module).double(), expected, atol=1e-5), module


def test_iso_cts_is_flat_and_with_the_whole_common_space_is_iso_c():
    adapters = [random_adapter(12), random_adapter(13), random_adapter(14)]
    cts = merge_adapters(adapters, method="iso_cts", rank=12).weights
    full = merge_adapters(
        adapters, method="iso_cts", rank=12, settings={"common_fraction": 1.0}
    ).weights
    iso = merge_adapters(adapters, method="iso_c", rank=12).weights
    for module in iso.factors:
        s = spectrum(cts.delta(module))
        assert s.numel() <= 12 and torch.allclose(s, torch.full_like(s, float(s[0])), atol=1e-5)
        assert torch.allclose(full.delta(module), iso.delta(module), atol=1e-5), module


def test_knots_alignment_is_lossless_and_one_task_at_full_density_comes_back():
    adapters = [random_adapter(15), random_adapter(16, rank=2)]
    space = core_space(contributions(adapters, [1.0, 1.0])[Q])
    u, blocks = aligned(space.cores)
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1]).double(), atol=1e-10)
    for core, block in zip(space.cores, blocks, strict=True):
        assert torch.allclose(u @ block, core, atol=1e-5)
    one = merge_adapters(adapters[:1], method="knots_ties", density=1.0).weights
    assert torch.allclose(one.delta(Q), adapters[0].delta(Q), atol=1e-5)
    merged, _ = merge_adapters(adapters, method="knots_ties", density=0.3, rank=6)
    assert {merged.rank(m) for m in merged.factors} <= {6}  # low rank, whatever the density


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def test_regmean_solves_the_least_squares_merge_and_keeps_the_bs():
    adapters = [random_adapter(17, rank=3), random_adapter(18, rank=2)]
    gen = torch.Generator().manual_seed(3)
    inputs = [  # each task's inputs of each module: (tokens, in)
        {m: torch.randn(40, a.shape[1], generator=gen) for m, (a, _) in w.factors.items()}
        for w in adapters
    ]
    grams = [{m: gram_of(x) for m, x in task.items()} for task in inputs]
    merged, _ = merge_adapters(
        adapters, method="regmean", rank=5, grams=grams, settings={"alpha": 1.0}
    )
    for module, deltas in dense(adapters).items():
        xs = [inputs[t][module].double() / 40**0.5 for t in range(2)]
        # min over D of Σ_t ||X_t Dᵀ - X_t Δ_tᵀ||²: stacked least squares
        x = torch.cat(xs)
        y = torch.cat([xt @ d.T for xt, d in zip(xs, deltas, strict=True)])
        expected = torch.linalg.lstsq(x, y).solution.T
        assert torch.allclose(merged.delta(module).double(), expected, atol=1e-4), module
        # exact low rank, in the span of the adapters' B columns
        bs = torch.cat([w.factors[module][1] for w in adapters], dim=1).double()
        b = merged.factors[module][1].double()
        assert torch.allclose(bs @ torch.linalg.lstsq(bs, b).solution, b, atol=1e-5)


def test_regmean_with_equal_grams_is_the_mean_of_the_updates():
    adapters = [random_adapter(19), random_adapter(20)]
    gen = torch.Generator().manual_seed(4)
    grams = {m: gram_of(torch.randn(80, a.shape[1], generator=gen))
             for m, (a, _) in adapters[0].factors.items()}  # fmt: skip
    merged = merge_adapters(adapters, method="regmean", rank=8, grams=[grams, grams]).weights
    mean = merge_adapters(adapters, weights=[0.5, 0.5], rank=8).weights
    for module in merged.factors:
        assert torch.allclose(merged.delta(module), mean.delta(module), atol=1e-5), module


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "regmean"}, "regmean needs calibration data: give one --calib source"),
        ({"method": "regmean", "grams": [{}]}, "got 1 calibration sources for 2 adapters"),
        ({"method": "iso_cts", "settings": {"alpha": 0.5}}, "unknown config keys.*alpha"),
        ({"method": "iso_cts", "settings": {"common_fraction": 0}}, r"common_fraction must be"),
        ({"method": "knots_ties", "density": 0}, r"density must be in \(0, 1\]"),
    ],
)
def test_bad_core_space_arguments_are_one_sentence(kwargs, message):
    with pytest.raises(RankwiseError, match=message):
        merge_adapters([random_adapter(0), random_adapter(1)], **kwargs)


@pytest.mark.parametrize("variant", ["DoRA", "KaSA"])
def test_dora_and_kasa_adapters_are_refused(variant):
    a, b = random_adapter(0), random_adapter(1)
    if variant == "DoRA":
        b.magnitudes = {m: torch.ones(bb.shape[0]) for m, (_, bb) in b.factors.items()}
    else:
        b.diagonals = {m: torch.ones(bb.shape[1]) for m, (_, bb) in b.factors.items()}
    with pytest.raises(RankwiseError, match=f"adapter 'b' is a {variant} adapter"):
        merge_adapters([a, b], names=["adapter 'a'", "adapter 'b'"])
