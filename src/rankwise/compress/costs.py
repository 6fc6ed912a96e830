"""What a model costs: parameters, matrix-product FLOPs per token and KV-cache bytes per token."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from rankwise.architectures import attention_shape, is_linear
from rankwise.compress.attention import A3Attention
from rankwise.compress.base import decoder_layers

DEFAULT_CONTEXT = 512  # tokens of context the attention FLOPs are counted at


@dataclass(frozen=True)
class Costs:
    """Sizes of one model, as ``rankwise compress`` reports them before and after."""

    params: int  # every parameter, tied ones once
    linear_params: int  # decoder linear-layer parameters: what the ratio is a fraction of
    flops_per_token: int  # 2·(multiply-adds) of all matrix products for one token
    kv_bytes_per_token: int  # keys and values cached per token, all layers
    context: int  # tokens of context behind flops_per_token

    def as_dict(self) -> dict:
        return asdict(self)


def attention_widths(layer: nn.Module, config) -> tuple[int, int, int, int]:
    """(query heads, KV heads, query/key width, value width) of one decoder layer's attention."""
    for module in layer.modules():
        if isinstance(module, A3Attention):
            return module.num_heads, module.num_kv_heads, module.qk_dim, module.value_dim
    heads, kv_heads, full = attention_shape(config)
    return heads, kv_heads, full, full


def model_costs(model: nn.Module, context: int = DEFAULT_CONTEXT) -> Costs:
    """Count ``model``'s costs; attention FLOPs assume ``context`` earlier tokens (QKᵀ and AV)."""
    _, layers = decoder_layers(model)
    linear_params = sum(
        p.numel()
        for layer in layers
        for module in layer.modules()
        if is_linear(module)
        for p in module.parameters()
    )
    weights = sum(m.weight.numel() for m in model.modules() if is_linear(m))
    attention_flops, kv_elements = 0, 0
    for layer in layers:
        heads, kv_heads, qk, value = attention_widths(layer, model.config)
        attention_flops += 2 * context * heads * (qk + value)
        kv_elements += kv_heads * (qk + value)
    element = next(model.parameters()).element_size()
    return Costs(
        params=sum(p.numel() for p in model.parameters()),
        linear_params=linear_params,
        flops_per_token=2 * weights + attention_flops,
        kv_bytes_per_token=kv_elements * element,
        context=context,
    )
