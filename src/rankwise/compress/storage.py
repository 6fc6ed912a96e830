"""Saving and rebuilding compressed models (the format is described in docs/compression.md).

A result that fits the standard architecture (every layer's MLP narrowed to one common width) is
saved as a plain transformers model. Anything else is saved as ``model.safetensors`` plus a
``config.json`` whose ``model_type`` is ``rankwise_compressed``: it holds the base model's config
and one JSON entry per module that differs from it, and rankwise rebuilds the model from them.
Plain transformers refuses that config instead of loading half-initialised weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rankwise.atomic import atomic_folder
from rankwise.compress.attention import A3Attention
from rankwise.compress.lowrank import LowRankLinear
from rankwise.errors import RankwiseError

MODEL_TYPE = "rankwise_compressed"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
RECORD = "rankwise_compression.json"  # method, settings, calibration and costs of the run


def reference_shapes(config: PretrainedConfig) -> dict[str, torch.Size]:
    """Parameter shapes of the uncompressed architecture ``config`` describes (built on meta)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: p.shape for name, p in model.state_dict().items()}


def structure_of(model: PreTrainedModel) -> dict[str, dict]:
    """One rebuild entry per module that differs from the architecture of ``model.config``."""
    reference = reference_shapes(model.config)
    entries: dict[str, dict] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{done}.") for done in entries):
            continue  # inside a module already described
        if isinstance(module, LowRankLinear | A3Attention):
            entries[name] = module.spec()
        elif (
            isinstance(module, nn.Linear) and reference.get(f"{name}.weight") != module.weight.shape
        ):
            entries[name] = {
                "type": "linear",
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
            }
    return entries


def standard_config(model: PreTrainedModel, structure: dict[str, dict]) -> PretrainedConfig | None:
    """The plain config the model fits (one narrower MLP width everywhere), or None if none does.

    The width is the one inner size of the narrowed linear layers (the MLP's input and output
    are the hidden size); the config it gives must describe every tensor shape exactly.
    """
    if not structure or any(e["type"] != "linear" for e in structure.values()):
        return None
    hidden = model.config.hidden_size
    sizes = {e[k] for e in structure.values() for k in ("in_features", "out_features")}
    widths = sizes - {hidden}
    if len(widths) != 1:
        return None
    config = copy.deepcopy(model.config)
    config.intermediate_size = widths.pop()
    actual = {name: p.shape for name, p in model.state_dict().items()}
    return config if reference_shapes(config) == actual else None


def build_module(entry: dict, original: nn.Module) -> nn.Module:
    """An empty module of the shape one rebuild entry describes, to replace ``original``.

    ``original`` is the base architecture's module at that name: an ``A3Attention`` takes its
    configuration, biases and per-head norms from it.
    """
    kind = entry.get("type")
    if kind == "low_rank":
        return LowRankLinear(
            entry["in_features"], entry["out_features"], entry["rank"], entry["bias"]
        )
    if kind == "linear":
        return nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"])
    if kind == "a3_attention":
        return A3Attention(original, entry["qk_pairs"], entry["value_dim"])
    raise RankwiseError(f"unknown compressed module type '{kind}'")


def check_output_folder(folder: str | Path) -> Path:
    """The output folder as a Path; an error if it exists and is not empty (nothing is replaced)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise RankwiseError(f"output folder '{folder}' exists and is not empty")
    return folder


def save_compressed(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path, record: dict
) -> bool:
    """Write model, tokenizer and ``record`` into a new folder; True if saved as a plain model.

    The folder is written under a temporary name and renamed when complete.
    """
    folder = check_output_folder(folder)
    structure = structure_of(model)
    config = standard_config(model, structure)

    def write(tmp: Path) -> None:
        if config is not None:
            model.config = config
            model.save_pretrained(tmp)
        else:
            save_safetensors(model, str(tmp / WEIGHTS))
            write_json(
                tmp / "config.json",
                {
                    "model_type": MODEL_TYPE,
                    "format_version": FORMAT_VERSION,
                    "base_config": model.config.to_dict(),
                    "modules": structure,
                },
            )
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD, record)

    atomic_folder(folder, write)  # an empty folder given as the output is replaced
    return config is not None


def holds_format(folder: str | Path, model_type: str) -> bool:
    """Whether ``folder``'s config.json names one of rankwise's own model formats."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") == model_type
    except (OSError, ValueError, AttributeError):
        return False


def is_compressed(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model in rankwise's compressed format (not a plain HF model)."""
    return holds_format(folder, MODEL_TYPE)


def base_of_record(folder: Path, kind: str, version: int) -> tuple[dict, PreTrainedModel]:
    """The folder's record and a fresh base model built from its ``base_config`` (real tensors:
    non-persistent buffers such as RoPE's inv_freq are made in __init__); the record's
    ``format_version`` must be ``version`` (``kind`` names the format in the error)."""
    meta = json.loads((folder / "config.json").read_text())
    if meta.get("format_version") != version:
        raise RankwiseError(
            f"'{folder}' holds {kind} format {meta.get('format_version')}; "
            f"this rankwise reads format {version}"
        )
    base = dict(meta["base_config"])
    config = AutoConfig.for_model(base.pop("model_type"), **base)
    return meta, AutoModelForCausalLM.from_config(config)


def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild a compressed model from ``folder`` (eval mode, every weight frozen)."""
    folder = Path(folder)
    meta, model = base_of_record(folder, "compressed-model", FORMAT_VERSION)
    for name, entry in meta["modules"].items():
        model.set_submodule(name, build_module(entry, model.get_submodule(name)))
    try:
        load_safetensors(model, str(folder / WEIGHTS), strict=True)
    except (OSError, RuntimeError) as err:
        raise RankwiseError(f"weights in '{folder}' do not match its config: {err}") from err
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(dtype).eval().requires_grad_(False)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2) + "\n")
