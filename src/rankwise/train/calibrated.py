"""Start factors of data-driven inits (CorDA, EVA), from calibration statistics of the base model.

The statistics are the compression pillar's (``compress.calibration``): moments of every
targeted layer's input in float64 on the model's device, over ``calib_samples`` blocks of
``seq_len`` tokens drawn from ``calib`` (the training data when unset), with a progress bar.
Layers that read the same tensor (q/k/v, gate/up) share one statistic. Every calibration
token counts (no label mask): the blocks are packed records, as compression reads them.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from tqdm import tqdm

from rankwise.adapters import LoraConfig
from rankwise.adapters.eva import (
    component_caps,
    covariance,
    distribute_ranks,
    have_converged,
    principal_components,
    refine,
)
from rankwise.adapters.inject import adaptable_modules, select_targets
from rankwise.adapters.weight_init import corda
from rankwise.architectures import dense_weight, shared_input
from rankwise.compress.calibration import GRAM, MEAN, calibration_data, collect_statistics
from rankwise.errors import RankwiseError
from rankwise.models import LoadedModel
from rankwise.train.config import TrainConfig

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
EVA_BATCH = 4  # calibration blocks per EVA step, between two convergence checks


def calibrated_start(loaded: LoadedModel, config: TrainConfig) -> tuple[LoraConfig, Factors]:
    """The adapter settings (EVA rewrites ranks and targets) and (A0, B0) per targeted module."""
    model = loaded.model
    names = select_targets(model, config.target_modules)
    reads = {name: shared_input(model.config, name) for name in names}
    calibration = calibration_data(
        loaded.tokenizer,
        config.calib or config.data,
        samples=config.calib_samples,
        seq_len=config.seq_len,
        seed=config.seed,
    ).input_ids
    lora, modules = config.lora(), adaptable_modules(model)
    if config.init == "eva":
        return eva_start(model, calibration, reads, config)
    stats = collect_statistics(model, calibration, {source: {GRAM} for source in reads.values()})
    factors = {}
    for name in names:
        spec = lora.expert_for(name)
        weight = dense_weight(modules[name]).to(torch.float32)  # [out, in]
        gram = stats.gram[reads[name]]
        factors[name] = corda(weight, gram, spec.rank, spec.scaling, config.init == "corda_ipm")
    return lora, factors


def eva_start(
    model: torch.nn.Module, calibration: torch.Tensor, reads: dict[str, str], config: TrainConfig
) -> tuple[LoraConfig, Factors]:
    """EVA (``adapters/eva.py``): read calibration batches until the components every layer
    needs stop moving, then give each layer its share of the rank budget."""
    lora, sources = config.lora(), sorted(set(reads.values()))
    ranks = {name: lora.expert_for(name).rank for name in reads}
    caps = component_caps(ranks, config.eva_rho)
    width = {s: max(caps[n] for n in reads if reads[n] == s) for s in sources}
    sums: dict[str, list[torch.Tensor]] = {}
    leading: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # source -> (rows, ratios)
    tokens, done = 0, False
    bar = tqdm(total=len(calibration), desc="eva", unit="block")
    for chunk in calibration.split(EVA_BATCH):
        stats = collect_statistics(model, chunk, {s: {GRAM, MEAN} for s in sources}, progress=False)
        tokens += stats.tokens
        moved = {}
        for s in sources:
            moments = [stats.gram[s] * stats.tokens, stats.mean[s] * stats.tokens]
            if s in sums:
                moments = [a + b for a, b in zip(sums[s], moments, strict=True)]
            sums[s] = moments
            cov = covariance(moments[0] / tokens, moments[1] / tokens)
            if s in leading:
                moved[s] = leading[s][0]
                leading[s] = refine(cov, leading[s][0])
            else:
                rows, share = principal_components(cov)
                leading[s] = rows[: width[s]], share[: width[s]]
        given = distribute_ranks({n: leading[reads[n]][1] for n in reads}, ranks, config.eva_rho)
        need = {s: max(given[n] for n in reads if reads[n] == s) for s in sources}
        done = len(moved) == len(sources) and all(
            have_converged(moved[s][: need[s]], leading[s][0][: need[s]], config.eva_tau)
            for s in sources
        )
        bar.update(len(chunk))
        if done:
            break
    bar.close()
    if not done:
        print(
            f"eva: components had not converged (tau {config.eva_tau}) after {len(calibration)} "
            "calibration blocks; they are the exact PCA of those blocks (raise --calib-samples "
            "for a stabler start)",
            file=sys.stderr,
        )
    exact = {
        s: principal_components(covariance(g / tokens, m / tokens)) for s, (g, m) in sums.items()
    }
    given = distribute_ranks({n: exact[reads[n]][1] for n in reads}, ranks, config.eva_rho)
    kept = {name: rank for name, rank in given.items() if rank > 0}
    if not kept:
        raise RankwiseError("eva gave every layer rank 0; raise --r or lower --eva-rho")
    alphas = {name: lora.expert_for(name).alpha * rank / ranks[name] for name, rank in kept.items()}
    modules = adaptable_modules(model)
    factors = {}
    for name, rank in kept.items():
        a = exact[reads[name]][0][:rank].to(torch.float32)
        factors[name] = (a, a.new_zeros(dense_weight(modules[name]).shape[0], rank))
    settings = dict(target_modules=list(kept), rank_pattern=kept, alpha_pattern=alphas)
    return dataclasses.replace(lora, **settings), factors
