"""Saving and loading NF-k quantised models (the format is described in docs/formats.md).

A folder holds ``config.json`` with ``model_type`` ``rankwise_quantized`` (the base model's
config, and one entry per quantised layer: bits, block, shape, bias), ``model.safetensors``
(every tensor of the model; a quantised layer's packed codes are ``<layer>.weight`` (uint8),
its double-quantised absmax ``<layer>.absmax_codes`` (int8), ``absmax_scale`` and
``absmax_mean`` (float32); an L4Q layer's (type ``int``) are ``<layer>.weight`` (uint8
codes) and ``<layer>.scale``, ``<layer>.offset`` (float32, one per group)), the tokenizer, and
``rankwise_quantization.json`` (the run's record). A method with a low-rank part (LoftQ,
LQ-LoRA) adds its initial PEFT adapter in ``adapter/``.
Plain transformers refuses the config instead of loading half-initialised weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rankwise.adapters.peft_format import LoraWeights, write_adapter
from rankwise.atomic import atomic_folder
from rankwise.compress.storage import base_of_record, holds_format
from rankwise.errors import RankwiseError
from rankwise.quantize.l4q import IntKLinear
from rankwise.quantize.nfk import NFkLinear

MODEL_TYPE = "rankwise_quantized"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
RECORD = "rankwise_quantization.json"
ADAPTER = "adapter"  # the initial low-rank part (LoftQ, LQ-LoRA), a PEFT adapter folder
LAYERS = {"nfk": NFkLinear, "int": IntKLinear}  # an entry's type -> the layer it rebuilds


def layer_entries(model: PreTrainedModel) -> dict[str, dict]:
    """One entry per quantised layer rankwise stores: what rebuilding it needs."""
    kinds = {cls: kind for kind, cls in LAYERS.items()}
    return {
        name: {
            "type": kinds[type(m)],
            "bits": m.bits,
            "block": m.block,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if type(m) in kinds
    }


def save_quantized(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    record: dict,
    adapter: LoraWeights | None = None,
) -> Path:
    """Write a quantised model (and its initial adapter, if any) into a new folder atomically."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise RankwiseError(f"output folder '{folder}' exists and is not empty")
    entries = layer_entries(model)
    if not entries:
        raise RankwiseError("the model has no NF-k or L4Q layers to save")

    def write(tmp: Path) -> None:
        save_safetensors(model, str(tmp / WEIGHTS))
        meta = {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "base_config": model.config.to_dict(),
            "layers": entries,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if adapter is not None:
            write_adapter(adapter, tmp / ADAPTER)

    return atomic_folder(folder, write)


def is_quantized(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model in rankwise's quantised format."""
    return holds_format(folder, MODEL_TYPE)


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild a quantised model (eval mode, frozen); its layers keep float32 constants."""
    folder = Path(folder)
    meta, model = base_of_record(folder, "quantised-model", FORMAT_VERSION)
    for name, e in meta["layers"].items():
        layer = LAYERS[e["type"]](
            e["in_features"], e["out_features"], e["bits"], e["block"], e["bias"]
        )
        model.set_submodule(name, layer)
    model.to(dtype)
    for layer in model.modules():
        if isinstance(layer, tuple(LAYERS.values())):
            layer.float()  # its scales stay float32 whatever the model's dtype
    try:
        load_safetensors(model, str(folder / WEIGHTS), strict=True)
    except (OSError, RuntimeError) as err:
        raise RankwiseError(f"weights in '{folder}' do not match its config: {err}") from err
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval().requires_grad_(False)
