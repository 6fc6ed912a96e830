"""A³ (arXiv 2505.12942): shrink the QK, OV and MLP widths of each layer by functional error.

Each component keeps the same number of matrix products, only narrower; R = E[x xᵀ] is the
second moment of the attention input (float64, damped before any root or inverse). A³ needs
Llama-style layers (``rankwise.architectures.LLAMA_STYLE``: Llama, Mistral, Qwen2, Qwen3).

- QK with RoPE and GQA (paper §3.4, appendix "Extending A³ for RoPE/GQA"): a CUR selection of
  whole RoPE frequency pairs per KV group. Channel i scores λ_i = (Σ_h E[q_{h,i}²])·E[k_i²]
  (the column norms of R^½ W_q stacked over the group's query heads times the key side's),
  with E[q_i²] = w_iᵀ R w_i + 2 b_i w_iᵀ E[x] + b_i² where the projection has a bias (Qwen2);
  a pair scores the sum over its two channels. Kept pairs, their bias entries included,
  contribute exactly as before. Skipped under per-head q/k norms (Qwen3): see ``qk_skip_reason``.
- OV with GQA (appendix "Extending A³ for GQA"): a joint SVD per KV group of
  R^½ [W_vo,1 … W_vo,g] (row-vector convention, W_vo,h = W_v W_o,h). Factors follow Theorem 3,
  W̃_vo = (R^½)⁻¹ SVD_r(R^½ W_vo): the shared value head is (R^½)⁻¹ U_r Σ_r and head h's output
  is V_rᵀ's block h. (The appendix writes (R^½)⁻¹ on the output heads instead, which does not
  give back W_vo even at full rank.) A value bias is folded exactly into o_proj's bias.
- MLP (§3.3): λ_i = E[h_i²]·‖W_down[:, i]‖² for intermediate channel i; the top channels stay.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch
from torch import nn

from rankwise.architectures import LLAMA_STYLE, attention_shape, qk_norms, rotary_fraction
from rankwise.compress.attention import A3Attention
from rankwise.compress.base import Compressor, damped, decoder_layers, keep_count
from rankwise.compress.calibration import GRAM, MEAN, SQ_MEAN, Statistics
from rankwise.compress.precision import for_factoring
from rankwise.errors import RankwiseError
from rankwise.options import option

log = logging.getLogger(__name__)

COMPONENTS = ("qk", "ov", "mlp")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class A3(Compressor):
    """A³ on Llama-style models; ``components`` picks which of QK, OV, MLP to shrink."""

    name: ClassVar[str] = "a3"
    components: list[str] = option(
        list(COMPONENTS),
        "widths to shrink: qk (RoPE pairs per KV group), ov (value heads), mlp (channels)",
        choices=COMPONENTS,
    )
    damping: float = option(
        0.01,
        "added to R's diagonal, relative to its mean, before R^½ and (R^½)⁻¹",
        within="[0, inf)",
    )

    def check(self) -> None:
        if not self.components:
            raise RankwiseError(f"a3 components must be some of {', '.join(COMPONENTS)}")

    def check_model(self, model: nn.Module) -> None:
        config = model.config
        if config.model_type not in LLAMA_STYLE:
            raise RankwiseError(
                f"a3 supports Llama-style attention ({', '.join(LLAMA_STYLE)}); "
                f"this model is '{config.model_type}'"
            )
        if rotary_fraction(config) != 1.0:
            raise RankwiseError(
                f"a3 selects RoPE pairs over whole heads; this {config.model_type} model rotates "
                f"only {rotary_fraction(config):.0%} of each head"
            )
        _, layers = decoder_layers(model)
        for index, layer in enumerate(layers):
            check_llama_layer(layer, index)
        reason = qk_skip_reason(layers[0].self_attn)
        if reason is None or "qk" not in self.components:
            return
        rest = [c for c in self.components if c != "qk"]
        if not rest:
            raise RankwiseError(f"a3 cannot shrink qk in {config.model_type}: {reason}")
        log.warning(
            "a3 leaves qk at full width in %s: %s; shrinking %s only",
            config.model_type,
            reason,
            ", ".join(rest),
        )

    def components_for(self, model: nn.Module) -> set[str]:
        """The components to shrink in ``model``: those asked for, less QK where it cannot be."""
        _, layers = decoder_layers(model)
        skip = {"qk"} if qk_skip_reason(layers[0].self_attn) else set()
        return set(self.components) - skip

    def needs(self, model: nn.Module) -> dict[str, set[str]]:
        prefix, layers = decoder_layers(model)
        shrunk = self.components_for(model)
        attention: set[str] = set()
        if shrunk & {"qk", "ov"}:
            attention.add(GRAM)  # R, for the pair scores and the OV factors
        if "qk" in shrunk:
            attention.add(MEAN)  # E[x], for the bias terms of the pair scores
        needs: dict[str, set[str]] = {}
        for index in range(len(layers)):
            if attention:
                needs[f"{prefix}.{index}.self_attn.q_proj"] = attention
            if "mlp" in shrunk:
                needs[f"{prefix}.{index}.mlp.down_proj"] = {SQ_MEAN}
        return needs

    def compress_layer(self, model: nn.Module, index: int, ratio: float, stats: Statistics) -> None:
        prefix, layers = decoder_layers(model)
        layer = layers[index]
        shrunk = self.components_for(model)
        if shrunk & {"qk", "ov"}:
            key = f"{prefix}.{index}.self_attn.q_proj"
            layer.self_attn = self.shrink_attention(layer.self_attn, stats, key, shrunk, ratio)
        if "mlp" in shrunk:
            sq_mean = stats.sq_mean[f"{prefix}.{index}.mlp.down_proj"]
            shrink_mlp(layer.mlp, sq_mean, keep_count(layer.mlp.down_proj.in_features, ratio))

    def shrink_attention(
        self, attn: nn.Module, stats: Statistics, key: str, shrunk: set[str], ratio: float
    ) -> A3Attention:
        """An ``A3Attention`` replacing ``attn`` with the ``shrunk`` components narrowed."""
        heads, kv_heads, full = attention_shape(attn.config)
        groups = heads // kv_heads
        gram = for_factoring(stats.gram[key])
        if "qk" in shrunk:
            scores = qk_pair_scores(attn, gram, for_factoring(stats.mean[key]), kv_heads)
            pairs = scores.topk(keep_count(full // 2, ratio), dim=-1).indices.sort(-1).values
            qk_pairs = pairs.tolist()
        else:
            qk_pairs = [list(range(full // 2))] * kv_heads
        value_dim = keep_count(full, ratio) if "ov" in shrunk else full
        new = A3Attention(attn, qk_pairs, value_dim).requires_grad_(False)
        # Rows of q_proj / k_proj each head keeps: its group's channels within its own head.
        index = new.rope_index  # (Hkv, w), on the model's device
        q_start = torch.arange(heads, device=index.device)[:, None] * full  # (H, 1)
        k_start = torch.arange(kv_heads, device=index.device)[:, None] * full  # (Hkv, 1)
        q_rows = (q_start + index.repeat_interleave(groups, dim=0)).flatten()  # (H·w,)
        k_rows = (k_start + index).flatten()  # (Hkv·w,)
        copy_linear(new.q_proj, attn.q_proj.weight[q_rows], bias_of(attn.q_proj, q_rows))
        copy_linear(new.k_proj, attn.k_proj.weight[k_rows], bias_of(attn.k_proj, k_rows))
        if "ov" in shrunk:
            v_weight, o_weight = ov_joint_factors(
                attn.v_proj.weight,
                attn.o_proj.weight,
                damped(gram, self.damping),
                groups,
                full,
                value_dim,
            )
        else:
            v_weight, o_weight = attn.v_proj.weight, attn.o_proj.weight
        copy_linear(new.v_proj, v_weight, None)
        copy_linear(new.o_proj, o_weight, folded_value_bias(attn, groups))
        return new


def check_llama_layer(layer: nn.Module, index: int) -> None:
    """Raise unless ``layer`` is an uncompressed Llama-style decoder layer of plain linears."""
    parts = [(getattr(layer, "self_attn", None), n) for n in ATTENTION_LINEARS] + [
        (getattr(layer, "mlp", None), n) for n in MLP_LINEARS
    ]
    if not all(isinstance(getattr(part, n, None), nn.Linear) for part, n in parts):
        raise RankwiseError(f"decoder layer {index} is not a plain Llama-style layer")


def qk_skip_reason(attn: nn.Module) -> str | None:
    """Why QK cannot be narrowed in this attention, or None where it can.

    Qwen3 normalises every query and key head by the RMS of all its head_dim channels before
    RoPE (q_norm, k_norm). Dropping pairs changes that RMS by a token-dependent factor, so no
    selection keeps the kept pairs' scores exact, and computing the full RMS needs the dropped
    channels, which is the q_proj/k_proj work the selection was to remove.
    """
    if qk_norms(attn) is None:
        return None
    return (
        "each query/key head is RMS-normalised over all its channels (q_norm/k_norm) before "
        "RoPE, so dropping RoPE pairs would rescale every kept score by a token-dependent factor"
    )


def channel_energy(linear: nn.Linear, gram: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """E[y_i²] of each output channel of ``linear`` (float64): w_iᵀRw_i (+ 2 b_i w_iᵀμ + b_i²)."""
    w = for_factoring(linear.weight)  # (out, in)
    energy = ((w @ gram) * w).sum(-1)  # (out,)
    if linear.bias is None:
        return energy
    b = for_factoring(linear.bias)  # (out,)
    return energy + 2 * b * (w @ mean) + b.square()


def qk_pair_scores(
    attn: nn.Module, gram: torch.Tensor, mean: torch.Tensor, kv_heads: int
) -> torch.Tensor:
    """Score (Hkv, head_dim/2) of every RoPE pair in every KV group (see the module docstring)."""
    q_moment = channel_energy(attn.q_proj, gram, mean)  # (H·d,): E[q_i²]
    k_moment = channel_energy(attn.k_proj, gram, mean)  # (Hkv·d,): E[k_i²]
    full = k_moment.shape[0] // kv_heads
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
    """New v_proj (Hkv·r, D) and o_proj (D, H·r) weights (float64) from a joint SVD per KV group."""
    root, root_inv = symmetric_roots(gram)
    wv, wo = for_factoring(v_weight), for_factoring(o_weight)
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


def folded_value_bias(attn: nn.Module, groups: int) -> torch.Tensor | None:
    """o_proj's bias with v_proj's folded in: attention rows sum to one, so b_v adds W_o b_v.

    None when neither has a bias; float64 otherwise (copied into the model's dtype later).
    """
    o_bias, v_bias = attn.o_proj.bias, attn.v_proj.bias
    if v_bias is None:
        return o_bias
    head_dim = attention_shape(attn.config)[2]
    per_head = v_bias.view(-1, head_dim).repeat_interleave(groups, dim=0)  # (H, d): b_v per head
    folded = for_factoring(attn.o_proj.weight) @ for_factoring(per_head.flatten())  # (D,)
    return folded if o_bias is None else folded + for_factoring(o_bias)


def shrink_mlp(mlp: nn.Module, sq_mean: torch.Tensor, keep: int) -> None:
    """Keep the ``keep`` intermediate channels with the largest E[h_i²]·‖W_down[:, i]‖²."""
    energy = for_factoring(mlp.down_proj.weight).square().sum(0)  # (I,)
    scores = for_factoring(sq_mean) * energy  # (I,)
    kept = scores.topk(keep).indices.sort().values.to(mlp.down_proj.weight.device)
    mlp.gate_proj = sliced(mlp.gate_proj, rows=kept)
    mlp.up_proj = sliced(mlp.up_proj, rows=kept)
    mlp.down_proj = sliced(mlp.down_proj, cols=kept)


def bias_of(linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor | None:
    """The bias entries of ``rows``, or None for a linear layer without bias."""
    return None if linear.bias is None else linear.bias[rows]


def sliced(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new ``nn.Linear`` (same device and dtype) holding chosen rows or columns of ``linear``."""
    weight = linear.weight if rows is None else linear.weight[rows]
    weight = weight if cols is None else weight[:, cols]
    bias = linear.bias if rows is None else bias_of(linear, rows)
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    copy_linear(new, weight, bias)
    return new.requires_grad_(False)


def copy_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy weight (and bias, which must be present exactly when the layer has one) into place.

    ``copy_`` converts to the layer's device and dtype: factors computed in float64 (or on the
    CPU, for MPS) land where the model lives.
    """
    if (bias is None) != (linear.bias is None):
        raise ValueError("bias presence differs between source and target")
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
