"""LoRA-LEGO (Zhao et al., arXiv 2409.16167): cluster rank-one units, one centroid per merged rank.

Rank i of an adapter is a Minimal Semantic Unit (a_i, b_i): row i of A and column i of B, whose
update is b_i a_iᵀ. The units of all adapters are pooled, clustered into k clusters by k-means,
and each cluster's centroid becomes one rank of the merged rank-k adapter. Then the paper's dual
reweighting: parameter reweighting scales each centroid's a and b back to the mean norm of its
members (a mean of unaligned vectors is shorter than they are: norm decay), and output
reweighting multiplies the merged update by sqrt(r / k), r being the adapters' rank, since the
output variance of a sum of k roughly independent units grows with k (variance expansion).

Choices the paper leaves open, made here (see docs/merging.md):
- coefficients: unit i of adapter t is scaled by sqrt(|w_t s_t|) on both sides (the sign on b),
  so pooled units carry each adapter's weight and LoRA scaling, which can differ per adapter;
- a unit is only defined up to (c a, b / c) and (-a, -b); before clustering each unit is
  balanced to ||a_i|| = ||b_i|| and its sign is fixed so a_i's largest-magnitude entry is
  positive, so that equal updates always get equal features;
- features are the concatenation [a_i; b_i], Euclidean k-means with k-means++ seeding and
  ``seed``; a cluster that empties takes the point farthest from its centroid;
- r in sqrt(r / k) is the mean rank of the adapters that adapt the module;
- the report's discarded energy is the k-means inertia over the units' total energy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rankwise.merge.base import Contribution, MergeMethod, MergeOptions, ModuleMerge

MAX_ITERATIONS = 100


def units(parts: Sequence[Contribution]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled, coefficient-scaled, balanced and sign-fixed units: a [N, in], b [N, out]."""
    a = torch.cat([math.sqrt(abs(p.coef)) * p.a for p in parts])  # (N, in)
    b = torch.cat([math.copysign(math.sqrt(abs(p.coef)), p.coef) * p.b.T for p in parts])
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)  # (N, 1)
    live = (norm_a > 0) & (norm_b > 0)
    balance = torch.where(live, (norm_b / norm_a.clamp_min(1e-30)).sqrt(), 0.0)
    a, b = a * balance, b * torch.where(live, 1 / balance.clamp_min(1e-30), 0.0)
    peak = a.gather(1, a.abs().argmax(dim=1, keepdim=True))  # (N, 1)
    sign = torch.where(peak < 0, -1.0, 1.0)
    return a * sign, b * sign


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: k rows of x, each drawn with probability ∝ squared distance."""
    first = int(torch.randint(x.shape[0], (1,), generator=gen, device=x.device))
    chosen = [first]
    d2 = (x - x[first]).square().sum(dim=1)  # (N,)
    for _ in range(1, k):
        weights = d2.clone()
        if weights.sum() <= 0:  # the rest duplicate chosen points: draw among unchosen ones
            weights = torch.ones_like(d2)
            weights[chosen] = 0
        nxt = int(torch.multinomial(weights, 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, (x - x[nxt]).square().sum(dim=1))
    return x[chosen].clone()


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid labels [N]; an empty cluster takes the farthest point of a larger one."""
    dist = torch.cdist(x, centroids)  # (N, k)
    labels = dist.argmin(dim=1)
    k = centroids.shape[0]
    own = dist.gather(1, labels[:, None]).squeeze(1)
    counts = torch.bincount(labels, minlength=k)
    for j in (counts == 0).nonzero().flatten().tolist():
        movable = counts[labels] > 1
        i = int(torch.where(movable, own, -1.0).argmax())
        counts[labels[i]] -= 1
        counts[j] += 1
        labels[i], own[i] = j, -1.0
    return labels


def cluster_means(values: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster mean of the rows of ``values`` (every cluster is non-empty)."""
    sums = torch.zeros(k, *values.shape[1:], dtype=values.dtype, device=values.device)
    sums.index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=k).to(values.dtype)
    return sums / counts.view(-1, *[1] * (values.dim() - 1))


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from k-means++ seeds: (labels [N], centroids [k, D])."""
    centroids = kmeans_pp(x, k, gen)
    labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for _ in range(MAX_ITERATIONS):
        new = assign(x, centroids)
        if torch.equal(new, labels):
            break
        labels = new
        centroids = cluster_means(x, labels, k)
    return labels, centroids


def restore_norms(
    centroids: torch.Tensor, members: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Parameter reweighting: scale each centroid to the mean norm of its cluster's members."""
    target = cluster_means(members.norm(dim=1), labels, centroids.shape[0])  # (k,)
    norm = centroids.norm(dim=1)
    factor = torch.where(norm > 0, target / norm.clamp_min(1e-30), 0.0)
    return centroids * factor[:, None]


class LegoMerge(MergeMethod):
    """Cluster the pooled rank-one units into k centroids, then the dual reweighting."""

    capacity_note = "the sum of the adapters' ranks, one unit per rank"

    def capacity(self, parts: Sequence[Contribution]) -> int:
        return sum(part.rank for part in parts)

    def merge(
        self, parts: Sequence[Contribution], rank: int, options: MergeOptions, gen: torch.Generator
    ) -> ModuleMerge:
        a, b = units(parts)  # (N, in), (N, out)
        features = torch.cat([a, b], dim=1)  # (N, in + out)
        labels, centroids = kmeans(features, rank, gen)
        fan_in = a.shape[1]
        merged_a = restore_norms(centroids[:, :fan_in], a, labels)  # (k, in)
        merged_b = restore_norms(centroids[:, fan_in:], b, labels)  # (k, out)
        mean_rank = sum(part.rank for part in parts) / len(parts)
        merged_b = merged_b * math.sqrt(mean_rank / rank)  # output reweighting
        return ModuleMerge(
            a=merged_a,
            b=merged_b.T.contiguous(),  # (out, k)
            discarded=float((features - centroids[labels]).square().sum()),
            total=float(features.square().sum()),
        )
