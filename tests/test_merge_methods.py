"""The pieces of TIES, DARE and LoRA-LEGO, checked by hand-sized examples and invariances."""

from __future__ import annotations

import math

import pytest
import torch
from test_merge import random_adapter

from rankwise.adapters import LoraWeights
from rankwise.merge import merge_adapters
from rankwise.merge.base import dense_svd
from rankwise.merge.dare import drop_and_rescale
from rankwise.merge.lego import cluster_means, kmeans, restore_norms
from rankwise.merge.ties import disjoint_mean, trim

TASKS = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, -4.0, 1.0, 1.0], [1.0, 2.0, -3.0, 0.1]])


def test_ties_trim_keeps_the_largest_magnitudes_per_task():
    trimmed = trim(TASKS, density=0.5)
    assert trimmed.tolist() == [[3.0, 0.0, 0.0, 2.0], [-2.0, -4.0, 0.0, 0.0], [0.0, 2.0, -3.0, 0.0]]


def test_ties_elects_sign_by_mass_and_averages_only_agreeing_entries():
    # Column sums 2, -3, -1.5, 3.1 elect + - - +; each column averages its agreeing entries.
    expected = torch.tensor([(3 + 1) / 2, (-1 - 4) / 2, -3.0, (2 + 1 + 0.1) / 3])
    assert torch.allclose(disjoint_mean(TASKS), expected)


def test_dare_drops_with_probability_and_rescales_survivors():
    deltas = torch.ones(2, 100, 100)
    first = drop_and_rescale(deltas, 0.25, torch.Generator().manual_seed(0))
    again = drop_and_rescale(deltas, 0.25, torch.Generator().manual_seed(0))
    other = drop_and_rescale(deltas, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 4.0}  # survivors scaled by 1 / 0.25
    assert (first > 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert first.mean().item() == pytest.approx(1.0, abs=0.1)  # expectation kept


def test_dare_merge_is_reproducible_from_its_seed():
    adapters = [random_adapter(0), random_adapter(1)]
    runs = [merge_adapters(adapters, method="dare_ties", seed=s).weights for s in (3, 3, 4)]
    module = next(iter(runs[0].factors))
    assert torch.equal(runs[0].delta(module), runs[1].delta(module))
    assert not torch.equal(runs[0].delta(module), runs[2].delta(module))


def regauged(weights: LoraWeights, scale: float) -> LoraWeights:
    """The same adapter written differently: every unit as (-scale a, -b / scale)."""
    factors = {m: (-scale * a, -b / scale) for m, (a, b) in weights.factors.items()}
    return LoraWeights(factors, dict(weights.alphas), base_model=weights.base_model)


def test_lego_clusters_equal_units_however_they_are_written():
    adapter = random_adapter(2)
    merged, report = merge_adapters([adapter, regauged(adapter, 7.0)], method="lego", rank=4)
    for module in adapter.factors:  # each cluster holds a unit and its copy: centroid = unit
        assert torch.allclose(merged.delta(module), adapter.delta(module), atol=1e-5), module
    assert report.discarded < 1e-10


def test_lego_at_full_rank_is_the_sum_scaled_by_output_reweighting():
    a, b = random_adapter(3), random_adapter(4)
    merged = merge_adapters([a, b], method="lego", rank=8).weights  # every unit its own cluster
    for module in a.factors:
        expected = (a.delta(module) + b.delta(module)) * math.sqrt(4 / 8)
        assert torch.allclose(merged.delta(module), expected, atol=1e-5), module


def test_lego_parameter_reweighting_restores_the_members_mean_norm():
    members = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    centroids = cluster_means(members, labels, 2)  # [1, 1] has decayed to norm sqrt(2)
    restored = restore_norms(centroids, members, labels)
    assert torch.allclose(restored, torch.tensor([[2**0.5, 2**0.5], [3.0, 4.0]]))


def test_lego_folds_adapter_weights_into_the_units():
    adapter = random_adapter(5)
    merged = merge_adapters([adapter], method="lego", weights=[2.0]).weights
    module = next(iter(adapter.factors))
    assert torch.allclose(merged.delta(module), 2 * adapter.delta(module), atol=1e-5)


def test_kmeans_finds_separated_clusters_and_fills_every_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    points = centres.repeat_interleave(5, dim=0) + 0.1 * torch.randn(15, 2, generator=gen)
    labels, centroids = kmeans(points, 3, gen)
    assert torch.bincount(labels).tolist() == [5, 5, 5]
    assert torch.cdist(centroids, centres).min(dim=1).values.max() < 0.2
    duplicates = torch.ones(6, 2)  # fewer distinct points than clusters: none left empty
    labels, _ = kmeans(duplicates, 4, gen)
    assert sorted(torch.bincount(labels, minlength=4).tolist())[0] >= 1


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_dense_svd_is_the_best_rank_k_fit(shape):
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(*shape, generator=gen) @ torch.diag(torch.logspace(0, -3, shape[1]))
    merged = dense_svd(matrix, 5)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert torch.allclose((merged.b @ merged.a).double(), best, atol=1e-5)
    dropped = float(s[5:].square().sum() / s.square().sum())
    assert merged.discarded / merged.total == pytest.approx(dropped)
