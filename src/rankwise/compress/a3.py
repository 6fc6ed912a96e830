"""A³ (arXiv 2505.12942): shrink the QK, OV and MLP widths of each layer by functional error.

Each component keeps the same number of matrix products, only narrower; R = E[x xᵀ] is the
second moment of the attention input (float64, damped before any root or inverse).

- QK with RoPE and GQA (paper §3.4, appendix "Extending A³ for RoPE/GQA"): a CUR selection of
  whole RoPE frequency pairs per KV group. With L = R^½ W_q stacked over the group's query
  heads and the key side R^½ W_k, channel i scores λ_i = ‖L_{:,i}‖²·‖R_{i,:}‖², which is
  (Σ_h E[q_{h,i}²])·E[k_i²]; a pair scores the sum over its two channels. Kept pairs contribute
  exactly as before.
- OV with GQA (appendix "Extending A³ for GQA"): a joint SVD per KV group of
  R^½ [W_vo,1 … W_vo,g] (row-vector convention, W_vo,h = W_v W_o,h). Factors follow Theorem 3,
  W̃_vo = (R^½)⁻¹ SVD_r(R^½ W_vo): the shared value head is (R^½)⁻¹ U_r Σ_r and head h's output
  is V_rᵀ's block h. (The appendix writes (R^½)⁻¹ on the output heads instead, which does not
  give back W_vo even at full rank.)
- MLP (§3.3): λ_i = E[h_i²]·‖W_down[:, i]‖² for intermediate channel i; the top channels stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rankwise.compress.attention import A3Attention, head_dim_of
from rankwise.compress.base import Compressor, damped, decoder_layers, keep_count
from rankwise.compress.calibration import GRAM, SQ_MEAN, Statistics
from rankwise.errors import RankwiseError

COMPONENTS = ("qk", "ov", "mlp")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class A3(Compressor):
    """A³ on Llama-architecture models; ``components`` picks which of QK, OV, MLP to shrink."""

    name: ClassVar[str] = "a3"
    components: tuple[str, ...] = COMPONENTS
    damping: float = 0.01  # added to R's diagonal, relative to its mean, before R^½ and (R^½)⁻¹

    def __post_init__(self) -> None:
        self.components = tuple(self.components)
        if not self.components or set(self.components) - set(COMPONENTS):
            raise RankwiseError(f"a3 components must be some of {', '.join(COMPONENTS)}")

    def needs(self, model: nn.Module) -> dict[str, set[str]]:
        prefix, layers = decoder_layers(model)
        needs: dict[str, set[str]] = {}
        for index in range(len(layers)):
            if {"qk", "ov"} & set(self.components):
                needs[f"{prefix}.{index}.self_attn.q_proj"] = {GRAM}
            if "mlp" in self.components:
                needs[f"{prefix}.{index}.mlp.down_proj"] = {SQ_MEAN}
        return needs

    def compress_layer(self, model: nn.Module, index: int, ratio: float, stats: Statistics) -> None:
        prefix, layers = decoder_layers(model)
        layer = layers[index]
        check_llama_layer(model, layer, index)
        if {"qk", "ov"} & set(self.components):
            gram = stats.gram[f"{prefix}.{index}.self_attn.q_proj"]
            layer.self_attn = self.shrink_attention(
                layer.self_attn, model.config, index, gram, ratio
            )
        if "mlp" in self.components:
            sq_mean = stats.sq_mean[f"{prefix}.{index}.mlp.down_proj"]
            shrink_mlp(layer.mlp, sq_mean, keep_count(layer.mlp.down_proj.in_features, ratio))

    def shrink_attention(
        self, attn: nn.Module, config, layer_idx: int, gram: torch.Tensor, ratio: float
    ) -> A3Attention:
        """An ``A3Attention`` replacing ``attn`` with the chosen components shrunk."""
        full, kv_heads = head_dim_of(config), config.num_key_value_heads
        groups = config.num_attention_heads // kv_heads
        if "qk" in self.components:
            scores = qk_pair_scores(attn.q_proj.weight, attn.k_proj.weight, gram, kv_heads)
            pairs = scores.topk(keep_count(full // 2, ratio), dim=-1).indices.sort(-1).values
        else:
            pairs = torch.arange(full // 2).expand(kv_heads, -1)
        value_dim = keep_count(full, ratio) if "ov" in self.components else full
        weight = attn.q_proj.weight
        new = A3Attention(config, layer_idx, pairs.tolist(), value_dim)
        new.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
        # Rows of q_proj / k_proj each head keeps: its group's channels within its own head.
        index = new.rope_index  # (Hkv, w)
        q_start = torch.arange(config.num_attention_heads, device=index.device)[:, None] * full
        k_start = torch.arange(kv_heads, device=index.device)[:, None] * full
        q_rows = (q_start + index.repeat_interleave(groups, dim=0)).flatten()  # (H·w,)
        k_rows = (k_start + index).flatten()  # (Hkv·w,)
        copy_linear(new.q_proj, attn.q_proj.weight[q_rows], bias_of(attn.q_proj, q_rows))
        copy_linear(new.k_proj, attn.k_proj.weight[k_rows], bias_of(attn.k_proj, k_rows))
        if "ov" in self.components:
            gram = damped(gram, self.damping)
            v_weight, o_weight = ov_joint_factors(
                attn.v_proj.weight, attn.o_proj.weight, gram, groups, full, value_dim
            )
            v_bias = None if attn.v_proj.bias is None else torch.zeros_like(new.v_proj.bias)
            copy_linear(new.v_proj, v_weight, v_bias)
            copy_linear(new.o_proj, o_weight, folded_value_bias(attn, groups, full))
        else:
            copy_linear(new.v_proj, attn.v_proj.weight, attn.v_proj.bias)
            copy_linear(new.o_proj, attn.o_proj.weight, attn.o_proj.bias)
        return new


def check_llama_layer(model: nn.Module, layer: nn.Module, index: int) -> None:
    """Raise unless ``layer`` is an uncompressed Llama decoder layer."""
    if getattr(model.config, "model_type", None) != "llama":
        raise RankwiseError(
            f"a3 supports Llama-architecture models; this one is "
            f"'{getattr(model.config, 'model_type', type(model).__name__)}'"
        )
    parts = [(layer.self_attn, n) for n in ATTENTION_LINEARS] + [
        (layer.mlp, n) for n in MLP_LINEARS
    ]
    if not all(isinstance(getattr(part, n, None), nn.Linear) for part, n in parts):
        raise RankwiseError(f"decoder layer {index} is not a plain Llama layer")


def qk_pair_scores(
    q_weight: torch.Tensor, k_weight: torch.Tensor, gram: torch.Tensor, kv_heads: int
) -> torch.Tensor:
    """Score (Hkv, head_dim/2) of every RoPE pair in every KV group (see the module docstring)."""
    wq, wk = q_weight.detach().double().cpu(), k_weight.detach().double().cpu()
    q_moment = ((wq @ gram) * wq).sum(-1)  # (H·d,): E[q_i²] = w_iᵀ R w_i
    k_moment = ((wk @ gram) * wk).sum(-1)  # (Hkv·d,)
    full = wk.shape[0] // kv_heads
    q_group = q_moment.view(kv_heads, -1, full).sum(1)  # (Hkv, d): summed over the group's heads
    scores = q_group * k_moment.view(kv_heads, full)  # (Hkv, d): λ_i per channel
    # HF's rotate_half rotates channel j with channel j + d/2 (the paper's "adjacent" pair).
    return scores[:, : full // 2] + scores[:, full // 2 :]  # (Hkv, d/2)


def symmetric_roots(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R^½, (R^½)⁻¹) of a symmetric positive definite matrix, by eigendecomposition."""
    values, vectors = torch.linalg.eigh(gram)
    values = values.clamp_min(torch.finfo(values.dtype).tiny)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def ov_joint_factors(
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    gram: torch.Tensor,
    groups: int,
    head_dim: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New v_proj (Hkv·r, D) and o_proj (D, H·r) weights from a joint SVD per KV group."""
    root, root_inv = symmetric_roots(gram)
    wv, wo = v_weight.detach().double().cpu(), o_weight.detach().double().cpu()
    hidden, width = wv.shape[1], groups * head_dim
    v_rows, o_cols = [], []
    for g in range(wv.shape[0] // head_dim):
        wv_g = wv[g * head_dim : (g + 1) * head_dim]  # (d, D): the group's value head, v = wv_g x
        heads = wo[:, g * width : (g + 1) * width].reshape(hidden, groups, head_dim)  # (D, g, d)
        wo_cat = heads.permute(2, 1, 0).reshape(head_dim, -1)  # (d, g·D): [W_o,1 … W_o,g]
        target = root @ wv_g.T @ wo_cat  # (D, g·D): R^½ [W_vo,1 … W_vo,g]
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        v_rows.append((root_inv @ (u[:, :rank] * s[:rank])).T)  # (r, D): ((R^½)⁻¹ U_r Σ_r)ᵀ
        blocks = vh[:rank].reshape(rank, groups, hidden)  # (r, g, D): head h's W̃_o,h
        o_cols.append(blocks.permute(2, 1, 0).reshape(hidden, -1))  # (D, g·r)
    return torch.cat(v_rows), torch.cat(o_cols, dim=1)  # (Hkv·r, D), (D, H·r)


def folded_value_bias(attn: nn.Module, groups: int, head_dim: int) -> torch.Tensor | None:
    """o_proj's bias with v_proj's folded in: attention rows sum to one, so b_v adds W_o b_v."""
    if attn.v_proj.bias is None:
        return attn.o_proj.bias
    per_head = attn.v_proj.bias.view(-1, head_dim).repeat_interleave(groups, dim=0)  # (H, d)
    return attn.o_proj.bias + attn.o_proj.weight @ per_head.flatten()


def shrink_mlp(mlp: nn.Module, sq_mean: torch.Tensor, keep: int) -> None:
    """Keep the ``keep`` intermediate channels with the largest E[h_i²]·‖W_down[:, i]‖²."""
    scores = sq_mean * mlp.down_proj.weight.double().square().sum(0).cpu()  # (I,)
    kept = scores.topk(keep).indices.sort().values
    mlp.gate_proj = sliced(mlp.gate_proj, rows=kept)
    mlp.up_proj = sliced(mlp.up_proj, rows=kept)
    mlp.down_proj = sliced(mlp.down_proj, cols=kept)


def bias_of(linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor | None:
    """The bias entries of ``rows``, or None for a linear layer without bias."""
    return None if linear.bias is None else linear.bias[rows]


def sliced(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new ``nn.Linear`` holding the chosen output rows or input columns of ``linear``."""
    weight = linear.weight if rows is None else linear.weight[rows]
    weight = weight if cols is None else weight[:, cols]
    bias = linear.bias if rows is None else bias_of(linear, rows)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
    copy_linear(new, weight, bias)
    return new


def copy_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy weight (and bias, which must be present exactly when the layer has one)."""
    with torch.no_grad():
        linear.weight.copy_(weight)
        if (bias is None) != (linear.bias is None):
            raise ValueError("bias presence differs between source and target")
        if bias is not None:
            linear.bias.copy_(bias)
