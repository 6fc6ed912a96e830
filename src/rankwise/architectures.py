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


class QuantizedLinear(nn.Module):
    """A frozen linear map whose weight is stored quantised (``rankwise.quantize``).

    Adapters wrap it like any linear map (``in_features``, ``out_features``, a ``weight`` tensor
    on the model's device holding the packed codes), but its weight cannot be changed in place:
    ``dense_weight`` refuses it, which refuses merging, weight-aware inits and DoRA in one place.
    """

    in_features: int
    out_features: int
    method: str  # the quantiser's registered name (nf4, fp4, int8, nf3, ...)

    def dequantized(self) -> torch.Tensor:
        """The weight the codes stand for, [out, in], in float32."""
        raise NotImplementedError(f"{type(self).__name__} does not implement dequantized")

    def storage_bytes(self) -> int:
        """Bytes the quantised weight takes: codes, scales and their own quantisation constants."""
        raise NotImplementedError(f"{type(self).__name__} does not implement storage_bytes")


LINEAR_TYPES = (nn.Linear, Conv1D, QuantizedLinear)
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
    """The weight as [out, in] (a transposed view for ``Conv1D``), so it can be updated in place.

    A quantised base has no such weight: refused in one line that says what to do instead.
    """
    if isinstance(module, QuantizedLinear):
        raise RankwiseError(
            f"the base weight is quantised ({module.method}) and cannot be changed in place "
            "(merging, weight-aware inits, DoRA): keep the adapter separate (--adapter), or load "
            "the model without --quantize to merge it into the dense weights"
        )
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


# Linear maps that read the very tensor a sibling in the same parent module reads, by model
# type, so one calibration statistic serves both. Fused projections (Phi-3's qkv_proj and
# gate_up_proj, GPT-NeoX's query_key_value, GPT-2's c_attn) share by fusion. Keyed by model type,
# not by name alone, because the names lie elsewhere: a cross-attention's k_proj reads another
# tensor than its q_proj. An unlisted type shares nothing, which is correct, only costlier.
LLAMA_SHARED_INPUTS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
SHARED_INPUTS: dict[str, dict[str, str]] = {
    model_type: LLAMA_SHARED_INPUTS
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2")
}

# Model types whose decoder layers are Llama's: self_attn.{q,k,v,o}_proj (GQA), RoPE by
# rotate_half over the whole head, mlp.{gate,up,down}_proj. They differ only in data: q/k/v
# biases (Qwen2), a per-head RMSNorm of queries and keys before RoPE (Qwen3's q_norm, k_norm)
# and sliding windows (Mistral, Qwen2/3 layers marked "sliding_attention").
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
QK_NORMED = ("qwen3",)


def shared_input(config: PretrainedConfig, name: str) -> str:
    """The module whose input ``name`` reads (``....k_proj`` -> ``....q_proj``), else ``name``."""
    parent, _, child = name.rpartition(".")
    sibling = SHARED_INPUTS.get(config.model_type, {}).get(child)
    return f"{parent}.{sibling}" if sibling else name


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of the uncompressed attention."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads  # GPT-2, GPT-NeoX: MHA
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def rotary_fraction(config: PretrainedConfig) -> float:
    """The fraction of each head that RoPE rotates (GPT-NeoX's ``rotary_pct``; 1 for Llama)."""
    return (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)


def attention_window(config: PretrainedConfig, layer_idx: int) -> int | None:
    """The sliding window of decoder layer ``layer_idx``, None for full causal attention.

    Qwen2/3 and Gemma2 mark each layer in ``layer_types``; Mistral slides in every layer.
    """
    kinds = getattr(config, "layer_types", None)
    return attention_windows(config)[kinds[layer_idx] if kinds is not None else None]


def qk_norms(attention: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The per-head (q_norm, k_norm) a Llama-style attention applies before RoPE, or None."""
    if attention.config.model_type in QK_NORMED:
        return attention.q_norm, attention.k_norm
    return None
