"""Check, calibrate, compress and measure in one call: what ``rankwise compress`` runs."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rankwise.compress.base import check_compressible, compress_layers
from rankwise.compress.calibration import (
    DEFAULT_DATA,
    Statistics,
    calibration_data,
    collect_statistics,
)
from rankwise.compress.costs import model_costs
from rankwise.compress.registry import make_compressor


def compress(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: str,
    ratio: float | Sequence[float],
    *,
    data: str = DEFAULT_DATA,
    samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    options: dict | None = None,
    base_model: str = "",
) -> dict:
    """Compress ``model`` in place and return the record ``save_compressed`` stores with it.

    ``ratio`` is the fraction of decoder linear-layer parameters to remove, one value or one per
    layer (mixed rank); ``options`` are the method's own settings (for example ``damping``).
    The options, the ratios and the method's ``check_model`` are all checked before calibration
    data is read, which happens only when the method needs statistics.
    """
    compressor = make_compressor(method, **(options or {}))
    ratios = check_compressible(model, compressor, ratio)
    before = model_costs(model)
    needs = compressor.needs(model)
    calibration = None
    stats = Statistics(tokens=0)
    if needs:
        calibration = calibration_data(tokenizer, data, samples=samples, seq_len=seq_len, seed=seed)
        stats = collect_statistics(model, calibration.input_ids, needs)
    compress_layers(model, compressor, ratios, stats)
    ratios_given = ratio if isinstance(ratio, int | float) else list(ratio)
    return {
        "base_model": base_model,
        "settings": {**compressor.settings(), "ratio": ratios_given},
        "calibration": calibration.record() if calibration else None,
        "costs": {"before": before.as_dict(), "after": model_costs(model).as_dict()},
    }
