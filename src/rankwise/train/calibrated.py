"""Start factors of data-driven inits (CorDA), from calibration statistics of the base model.

The statistics are the compression pillar's (``compress.calibration``): E[x x^T] of every
targeted layer's input in float64 on the model's device, over ``calib_samples`` blocks of
``seq_len`` tokens drawn from ``calib`` (the training data when unset), one forward pass with a
progress bar. Layers that read the same tensor (q/k/v, gate/up) share one statistic.
"""

from __future__ import annotations

import torch

from rankwise.adapters.inject import adaptable_modules, select_targets
from rankwise.adapters.weight_init import DATA_INITS, corda
from rankwise.architectures import dense_weight, shared_input
from rankwise.compress.calibration import GRAM, calibration_data, collect_statistics
from rankwise.models import LoadedModel
from rankwise.train.config import TrainConfig


def calibrated_factors(
    loaded: LoadedModel, config: TrainConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A0, B0) per targeted module for the config's data-driven init."""
    model = loaded.model
    names = select_targets(model, config.target_modules)
    reads = {name: shared_input(model.config, name) for name in names}
    calibration = calibration_data(
        loaded.tokenizer,
        config.calib or config.data,
        samples=config.calib_samples,
        seq_len=config.seq_len,
        seed=config.seed,
    )
    needs = {source: {GRAM} for source in reads.values()}
    stats = collect_statistics(model, calibration.input_ids, needs)
    modules, largest = adaptable_modules(model), DATA_INITS[config.init]
    factors = {}
    for name in names:
        spec = config.expert_for(name)
        weight = dense_weight(modules[name]).to(torch.float32)  # [out, in]
        factors[name] = corda(weight, stats.gram[reads[name]], spec.rank, spec.scaling, largest)
    return factors
