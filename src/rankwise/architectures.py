"""What differs between model architectures, in one place; the rest of rankwise names none.

Adapters target every linear map of a decoder: ``nn.Linear`` and GPT-2's ``Conv1D``, which
stores its weight transposed ([in, out], PEFT's ``fan_in_fan_out``). Fused projections (Phi-3's
``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's ``query_key_value``) are ordinary linear maps and
get one adapter each, as in PEFT. Decoder blocks are ``layers.N`` (Llama, Qwen, Mistral, Gemma,
Phi-3, GPT-NeoX) or ``h.N`` (GPT-2); Gemma2 soft-caps its logits.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from rankwise.errors import RankwiseError

LINEAR_TYPES = (nn.Linear, Conv1D)
BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")  # model.layers.3.mlp, transformer.h.3
BLOCK_LISTS = ("layers", "h")  # the attribute holding a model's decoder blocks


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map adapters can wrap (``nn.Linear`` or ``Conv1D``)."""
    return isinstance(module, LINEAR_TYPES)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear map of either layout."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a transposed view for ``Conv1D``), so it can be updated in place."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def is_transposed(module: nn.Module) -> bool:
    """Whether the weight is stored [in, out] (PEFT's ``fan_in_fan_out``)."""
    return isinstance(module, Conv1D)


def block_index(module_name: str) -> int:
    """The decoder block a module belongs to (``...layers.<i>.`` or ``...h.<i>.``), 0 if none."""
    found = BLOCK.search(module_name)
    return int(found.group(1)) if found else 0


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's decoder blocks.

    Raises ``LookupError`` when the model has none (callers word the error for their verb).
    """
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in BLOCK_LISTS and isinstance(module, nn.ModuleList):
            return name, module
    raise LookupError(f"{type(model).__name__} has no list of decoder blocks")


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on hidden states, in fp32, with the model's final soft-capping (Gemma2)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# Attention layer types whose masks the serving engine builds: causal, and causal within a window.
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_windows(config: PretrainedConfig) -> dict[str | None, int | None]:
    """The sliding window (None: full causal attention) of each mask a decoder's forward takes.

    A config listing ``layer_types`` (Gemma2's alternating sliding and full layers, Qwen2/3)
    means the forward takes a dict of 4-D masks keyed by layer type, as transformers'
    ``create_masks_for_generate`` builds them; otherwise it takes one mask for every layer (the
    key None), windowed by ``sliding_window`` (Mistral, Phi-3) or full. Raises ``RankwiseError``
    for any other kind of attention (chunked, linear, ...), which these masks cannot express.
    """
    window = getattr(config, "sliding_window", None)
    if getattr(config, "attention_chunk_size", None):
        raise RankwiseError(f"{config.model_type} uses chunked attention, which serving does not")
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        return {None: window}
    unknown = sorted(set(kinds) - set(MASKED_LAYER_TYPES))
    if unknown:
        raise RankwiseError(
            f"{config.model_type} has {', '.join(unknown)} layers; serving supports only "
            "full and sliding-window attention"
        )
    return {kind: window if kind == "sliding_attention" else None for kind in dict.fromkeys(kinds)}
