"""Llama-style attention with narrower heads, as A³ (arXiv 2505.12942) leaves it.

Each KV group (one key head and the query heads sharing it) keeps its own subset of RoPE
frequency pairs, so its query/key width is 2·len(pairs); every value head has width
``value_dim``. Scores keep the original 1/sqrt(head_dim) scale, so a kept pair contributes to
the pre-softmax score exactly what it did before. The projections stay four ``nn.Linear``
layers (adaptable by LoRA) and the KV cache stores the narrower keys and values.

One class serves every Llama-style family (``rankwise.architectures.LLAMA_STYLE``); what
differs is read from the attention it replaces: which projections have a bias, Qwen3's per-head
q_norm/k_norm (kept, and only allowed at full query/key width) and the layer's sliding window
(Mistral, Qwen2/3), which is handed to the attention kernel exactly as the original does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from rankwise.architectures import attention_shape, attention_window, qk_norms


class A3Attention(nn.Module):
    """Attention where KV group g keeps RoPE pairs ``qk_pairs[g]``; values are value_dim wide.

    Built beside ``original`` (the model's own attention of that layer), on its device and in
    its dtype, with empty projections: the caller fills them (A³) or loads them (storage).
    q_proj and k_proj have a bias where the original's do; v_proj has none, because a value
    bias is folded into o_proj's (attention rows sum to one), which exists where the original
    o_proj or v_proj had a bias.
    """

    def __init__(self, original: nn.Module, qk_pairs: Sequence[Sequence[int]], value_dim: int):
        super().__init__()
        config = self.config = original.config
        self.layer_idx = original.layer_idx
        self.num_heads, self.num_kv_heads, full = attention_shape(config)
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        widths = {len(pairs) for pairs in qk_pairs}
        if len(qk_pairs) != self.num_kv_heads or len(widths) != 1:
            raise ValueError("qk_pairs needs one equally long list of pairs per KV head")
        self.qk_dim = 2 * widths.pop()
        self.value_dim = value_dim
        self.scaling = full**-0.5  # the original scale: kept pairs stay exact
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = attention_window(config, self.layer_idx)
        weight = original.q_proj.weight
        made = {"device": weight.device, "dtype": weight.dtype}
        hidden = config.hidden_size
        q_bias, k_bias = original.q_proj.bias is not None, original.k_proj.bias is not None
        o_bias = original.o_proj.bias is not None or original.v_proj.bias is not None
        self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_dim, bias=q_bias, **made)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.qk_dim, bias=k_bias, **made)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * value_dim, bias=False, **made)
        self.o_proj = nn.Linear(self.num_heads * value_dim, hidden, bias=o_bias, **made)
        norms = qk_norms(original)
        if norms is not None and self.qk_dim != full:
            raise ValueError("per-head q/k norms need the full head width (docs/compression.md)")
        self.q_norm, self.k_norm = norms or (nn.Identity(), nn.Identity())
        # Channels of the full head each group keeps: HF's rotate_half pairs channel j with
        # j + full/2, so keeping [pairs, pairs + full/2] keeps that layout in the narrow head.
        pairs = torch.tensor([list(p) for p in qk_pairs], dtype=torch.long, device=weight.device)
        self.register_buffer(
            "rope_index", torch.cat([pairs, pairs + full // 2], dim=-1), persistent=False
        )  # (Hkv, 2P)

    def spec(self) -> dict:
        """The JSON entry that rebuilds this module's shape (see docs/compression.md)."""
        half = self.qk_dim // 2
        return {
            "type": "a3_attention",
            "layer_idx": self.layer_idx,
            "qk_pairs": self.rope_index[:, :half].tolist(),
            "value_dim": self.value_dim,
        }

    def rotated_qk(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, qk_dim) and keys (B, Hkv, T, qk_dim) after RoPE on the kept pairs."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.qk_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.qk_dim)
        q = self.q_norm(q).transpose(1, 2)  # (B, H, T, w): normalised per head, as Qwen3 does
        k = self.k_norm(k).transpose(1, 2)  # (B, Hkv, T, w)
        cos, sin = position_embeddings  # (B, T, head_dim)
        cos_k = cos[:, :, self.rope_index].permute(0, 2, 1, 3)  # (B, Hkv, T, w)
        sin_k = sin[:, :, self.rope_index].permute(0, 2, 1, 3)  # (B, Hkv, T, w)
        groups = self.num_key_value_groups
        cos_q = cos_k.repeat_interleave(groups, dim=1)  # (B, H, T, w): head h is in group h // g
        sin_q = sin_k.repeat_interleave(groups, dim=1)  # (B, H, T, w)
        return q * cos_q + rotate_half(q) * sin_q, k * cos_k + rotate_half(k) * sin_k

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        query, key = self.rotated_qk(hidden_states, position_embeddings)
        value = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.value_dim)
        value = value.transpose(1, 2)  # (B, Hkv, T, value_dim)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )  # output: (B, T, H, value_dim)
        output = output.reshape(batch, length, self.num_heads * self.value_dim)
        return self.o_proj(output), weights
