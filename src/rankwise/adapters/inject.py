"""Attaching low-rank experts to a model: target selection, injection, merge, removal.

Injection is one explicit call that swaps each targeted ``nn.Linear`` for a ``LowRankExperts``
wrapping it and returns the names it replaced; nothing is patched behind the user's back.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.coefficients import NOLA, LoLDU
from rankwise.adapters.dora import DoRA
from rankwise.adapters.init import POLICY_INITS, check_init
from rankwise.adapters.kasa import PENALTIES, KaSA
from rankwise.adapters.l4q import L4Q
from rankwise.adapters.layer import ExpertSpec, LinearWrapper, LowRankExperts
from rankwise.adapters.lori import b_masks, freeze_random_a, mask_b
from rankwise.architectures import is_linear
from rankwise.errors import RankwiseError
from rankwise.options import Options, flagless, option

ALL_LINEAR = "all-linear"


def parse_targets(text: str) -> list[str] | str:
    """``--target-modules``: ``all-linear``, or module names separated by commas (one name is a
    list of one, never a regex; a regex is given as a YAML string)."""
    return ALL_LINEAR if text == ALL_LINEAR else [name for name in text.split(",") if name]


def target_option() -> list[str] | str:
    """The ``target_modules`` setting, declared once for adapters and mixtures."""
    return option(
        ALL_LINEAR,
        "modules to adapt: all-linear (every linear layer but the output head), names (matched "
        "as the name or its dotted suffix) or, in YAML, one regex matched against whole names",
        parse=parse_targets,
    )


@dataclass
class LoraConfig(Options):
    """A plain LoRA adapter's settings, named as in PEFT's ``LoraConfig``."""

    r: int = option(
        16, "LoRA rank of every adapted module (rank_pattern may differ)", within="[1, inf)"
    )
    lora_alpha: float = option(
        32.0, "scaling numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)"
    )
    target_modules: list[str] | str = target_option()
    lora_dropout: float = option(
        0.0, "dropout on the adapter's input, training only", within="[0, 1)"
    )
    use_rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r) (arXiv 2312.03732)")
    use_dora: bool = option(
        False, "DoRA: a trained magnitude per output row of the adapted weight (arXiv 2402.09353)"
    )
    init: str = option(
        "init_a",
        "how the factors start: init_a, init_b, gaussian (B A = 0); pissa, pissa_niter_N, olora "
        "(taken from W, which keeps the residual); corda_ipm, corda_kpm, eva (from --calib "
        "data); kasa (W loses its r smallest singular triplets, a singular-value diagonal "
        "trains); loldu, nola (frozen factors, trained coefficients)",
    )
    kasa_beta: float = option(
        PENALTIES[0], "kasa: weight of the singular values' L2 penalty", within="[0, inf)"
    )
    kasa_gamma: float = option(
        PENALTIES[1], "kasa: weight of the factors' orthogonality penalty", within="[0, inf)"
    )
    nola_bases: int = option(64, "nola: random bases per factor (k)", within="[1, inf)")
    nola_seed: int = option(0, "nola: seed of the random bases (layer i draws from seed + i)")
    lori_seed: int | None = option(
        None,
        "LoRI (arXiv 2504.07448): A is a frozen random projection drawn from this seed (give each "
        "task its own) and only B trains, so adapters of different tasks merge with little "
        "interference",
    )
    lori_a_density: float = option(
        1.0, "LoRI: fraction of the frozen A's entries kept (a sparse projection)", within="(0, 1]"
    )
    lori_b_mask: str | None = option(
        None,
        "LoRI-S: a dense LoRI run's adapter folder (same seed); only its largest |B| entries "
        "(lori_b_density of them) train here, the rest of B stays zero",
    )
    lori_b_density: float = option(
        0.1, "LoRI-S: fraction of B's entries trained (the paper's 90% sparsity)", within="(0, 1]"
    )
    l4q_bits: int | None = option(
        None,
        "L4Q (arXiv 2402.04902): train through a k-bit quantiser of W + s B A with learned steps "
        "and offsets; the merged weight is quantised (export: quantize --method l4q)",
        within="[2, 8]",
    )
    l4q_group: int = option(64, "L4Q: inputs per quantisation group of a row", within="[1, inf)")
    rank_pattern: dict[str, int] = flagless({}, "module-name pattern -> rank (YAML only)")
    alpha_pattern: dict[str, float] = flagless({}, "module-name pattern -> alpha (YAML only)")

    def check(self) -> None:
        super().check()
        check_init(self.init)
        if any(r < 1 for r in self.rank_pattern.values()):
            raise RankwiseError("LoRA ranks in rank_pattern must be positive integers")
        if self.use_dora and self.init in POLICY_INITS:
            raise RankwiseError(f"use_dora and init {self.init} do not combine: each is a policy")
        if self.l4q_bits is not None and (self.use_dora or self.init in POLICY_INITS):
            raise RankwiseError(f"l4q_bits combines with neither use_dora nor init {self.init}")
        if self.lori_seed is not None and (self.init != "init_a" or self.use_dora):
            raise RankwiseError("LoRI (lori_seed) draws A itself: use it with init_a and no DoRA")
        if self.lori_b_mask and self.lori_seed is None:
            raise RankwiseError("LoRI-S (lori_b_mask) needs the dense run's lori_seed")

    def expert_for(self, module_name: str) -> ExpertSpec:
        """The expert spec for one module, with rank and alpha patterns applied."""
        rank_key = pattern_key(self.rank_pattern, module_name)
        alpha_key = pattern_key(self.alpha_pattern, module_name)
        return ExpertSpec(
            rank=self.rank_pattern[rank_key] if rank_key else self.r,
            alpha=self.alpha_pattern[alpha_key] if alpha_key else self.lora_alpha,
            use_rslora=self.use_rslora,
            dropout=self.lora_dropout,
            init=self.init,
        )


def pattern_key(patterns: Iterable[str], module_name: str) -> str | None:
    """The first pattern that matches the module name's end at a dot boundary (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers adapters can target: every ``nn.Linear`` or ``Conv1D`` but the output head.

    Linears already wrapped (``LowRankExperts``, the serving slots: any ``LinearWrapper``) count
    under the wrapper's name.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearWrapper):
            found[name] = module.base
        elif is_linear(module) and module is not head and name not in found:
            parent = name.rpartition(".")[0]
            if parent not in found:  # skip the ``base`` inside a wrapper
                found[name] = module
    return found


def select_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Names of the linear layers that ``target_modules`` selects; unknown names are an error."""
    available = adaptable_modules(model)
    if not available:
        raise RankwiseError(f"{type(model).__name__} has no linear layers adapters can target")
    if target_modules == ALL_LINEAR:
        return list(available)
    if isinstance(target_modules, str):
        chosen = [n for n in available if re.fullmatch(target_modules, n)]
        unmatched = [] if chosen else [target_modules]
    else:
        chosen = [
            n for n in available if any(n == t or n.endswith("." + t) for t in target_modules)
        ]
        unmatched = [
            t for t in target_modules if not any(n == t or n.endswith("." + t) for n in chosen)
        ]
    if unmatched or not chosen:
        hint = " (a YAML string is one regex)" if isinstance(target_modules, str) else ""
        raise RankwiseError(
            f"target modules {unmatched or target_modules} match no linear layer of the model"
            f"{hint}; available: {', '.join(module_kinds(available))}"
        )
    return chosen


def module_kinds(modules: Iterable[str]) -> list[str]:
    """The distinct last components of module names (q_proj, up_proj, ...), in model order."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in modules))


def inject_experts(
    model: nn.Module,
    experts: Mapping[str, Sequence[ExpertSpec]],
    initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, LowRankExperts]:
    """Replace each named linear layer by a ``LowRankExperts`` holding the given experts.

    Freezes every base parameter of the model first; returns the new layers by name.
    ``initial`` gives computed start factors (A0, B0) per module (a data-driven init).
    """
    available = adaptable_modules(model)
    model.requires_grad_(False)
    layers: dict[str, LowRankExperts] = {}
    for name, specs in experts.items():
        if name not in available:
            raise RankwiseError(f"the model has no linear layer named '{name}'")
        current = model.get_submodule(name)
        if isinstance(current, LinearWrapper):
            raise RankwiseError(f"'{name}' already holds adapters; call remove_experts first")
        layers[name] = LowRankExperts(current, specs, initial=(initial or {}).get(name))
    swap_modules(model, layers)
    return layers


def swap_modules(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module at its qualified name in ``model``; returns the replaced ones by name.

    The one way rankwise changes a model's structure: an explicit call, what it replaced
    returned, so the caller can put it back.
    """
    replaced = {}
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        replaced[name] = getattr(parent, child)
        setattr(parent, child, module)
    return replaced


def inject_adapter(
    model: nn.Module,
    config: LoraConfig,
    initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, LowRankExperts]:
    """Attach one fresh LoRA adapter (one expert per targeted module) as ``config`` says.

    ``initial``: start factors per module for a data-driven init (see ``inject_experts``).
    """
    names = select_targets(model, config.target_modules)
    layers = inject_experts(model, {name: [config.expert_for(name)] for name in names}, initial)
    for index, (name, layer) in enumerate(layers.items()):
        if config.use_dora:
            layer.policy = DoRA(layer)
        elif config.l4q_bits is not None:
            layer.policy = L4Q(layer, config.l4q_bits, config.l4q_group, name)
        elif config.init == "kasa":
            layer.policy = KaSA(layer, beta=config.kasa_beta, gamma=config.kasa_gamma)
        elif config.init == "loldu":
            layer.policy = LoLDU(layer)
        elif config.init == "nola":
            layer.policy = NOLA(layer, config.nola_bases, config.nola_seed + index)
    if config.init == "kasa":
        warn_kasa_truncation(layers)
    if config.lori_seed is not None:
        freeze_random_a(layers, config.lori_seed, config.lori_a_density)
    if config.lori_b_mask:
        mask_b(layers, b_masks(config.lori_b_mask, config.lori_b_density))
    return layers


def warn_kasa_truncation(layers: Mapping[str, LowRankExperts], limit: float = 0.05) -> None:
    """Say when KaSA's truncation took a visible share of some W (a large r on a narrow layer:
    at r 16 SmolLM2's 192-wide v_proj loses up to 17% of its norm)."""
    name, layer = max(layers.items(), key=lambda item: item[1].policy.dropped_share)
    share = layer.policy.dropped_share
    if share > limit:
        print(
            f"kasa: dropping the r smallest singular triplets took {share:.0%} "
            f"of {name}'s norm; the model starts that far from its base (a smaller r keeps more)",
            file=sys.stderr,
        )


def expert_layers(model: nn.Module) -> dict[str, LowRankExperts]:
    """Every ``LowRankExperts`` layer of the model by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankExperts)}


def remove_experts(model: nn.Module) -> dict[str, LowRankExperts]:
    """Put the original linear layers back (unmerging first); returns the removed layers.

    Each layer's policy releases what it attached elsewhere (X-LoRA's hook on the decoder) and
    a weight-aware init's residual is undone, so the model is the bare base model again.
    """
    removed = expert_layers(model)
    for layer in removed.values():
        layer.policy.release()
        if layer.merged:
            layer.unmerge()
        layer.policy.restore(layer)
        layer.restore_base()
    swap_modules(model, {name: layer.base for name, layer in removed.items()})
    return removed


def merge_experts(model: nn.Module) -> None:
    """Fold every layer's static-gated update into its base weight (an explicit call)."""
    for layer in expert_layers(model).values():
        layer.merge()


def unmerge_experts(model: nn.Module) -> None:
    """Undo ``merge_experts``."""
    for layer in expert_layers(model).values():
        layer.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_trainable(model: nn.Module) -> str:
    """One line in PEFT's wording: trainable params, all params and the trainable share."""
    trainable, total = count_parameters(model)
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
