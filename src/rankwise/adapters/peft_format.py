"""PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's: ``base_model.model.<module>.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]), so adapters written here load in PEFT, vLLM and llama.cpp's
converter, and PEFT adapters load here. Only safetensors are read: pickle files are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankwise.adapters.inject import (
    pattern_key,
)
from rankwise.adapters.kasa import PENALTIES
from rankwise.adapters.layer import ExpertSpec
from rankwise.atomic import atomic_file
from rankwise.errors import RankwiseError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
KEY = re.compile(
    rf"^{re.escape(PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lora_diag)$"
)
PARTS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_magnitude_vector": "magnitude",
    "lora_diag": "diagonal",
}
# PEFT options that change the computation in ways plain LoRA does not model.
UNSUPPORTED = {
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
}


@dataclass
class LoraWeights:
    """One LoRA adapter in memory: per-module factors and scales, independent of any model."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])
    alphas: dict[str, float]  # module -> alpha
    use_rslora: bool = False
    dropout: float = 0.0
    base_model: str | None = None
    # the adapted layers store their weight [in, out] (GPT-2's Conv1D); the factors' shapes are
    # the same either way, only merging into such a base transposes the update
    fan_in_fan_out: bool = False
    # DoRA's trained magnitude per output row, module -> [out] (empty: a plain LoRA adapter)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    # KaSA's trained singular values, module -> [r], and its penalties' weights (beta, gamma);
    # the base it fits is W without its r smallest singular triplets (``adapters/kasa.py``)
    diagonals: dict[str, torch.Tensor] = field(default_factory=dict)
    kasa: tuple[float, float] = PENALTIES

    @property
    def variant(self) -> str | None:
        """The LoRA variant that changes how the update meets W ("DoRA", "KaSA"), or None."""
        return "DoRA" if self.magnitudes else "KaSA" if self.diagonals else None

    def rank(self, module: str) -> int:
        return self.factors[module][0].shape[0]

    def expert(self, module: str) -> ExpertSpec:
        """This adapter's expert spec for one module."""
        return ExpertSpec(self.rank(module), self.alphas[module], self.use_rslora, self.dropout)

    def scaling(self, module: str) -> float:
        return self.expert(module).scaling

    def delta(self, module: str) -> torch.Tensor:
        """The dense update s B A of one module, [out, in]."""
        a, b = self.factors[module]
        if module in self.diagonals:
            b = b * self.diagonals[module]
        return self.scaling(module) * (b @ a)


def read_adapter(path: str | os.PathLike) -> LoraWeights:
    """Read a PEFT-format LoRA adapter folder; every problem is a one-sentence ``RankwiseError``."""
    folder = Path(path)
    if not folder.is_dir():
        raise RankwiseError(f"adapter folder '{folder}' does not exist")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [name for name in PICKLE_FILES if (folder / name).is_file()]
        if pickled:
            raise RankwiseError(
                f"'{folder / pickled[0]}' is a pickle file, which rankwise never loads (it can run "
                "code); convert it where you trust it: PeftModel.from_pretrained(...)"
                ".save_pretrained(out, safe_serialization=True)"
            )
        raise RankwiseError(f"adapter folder '{folder}' has no {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise RankwiseError(f"adapter folder '{folder}' has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RankwiseError(f"'{config_path}' is not valid JSON: {err}") from err
    check_supported(config, config_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise RankwiseError(
            f"'{weights_path}' is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err
    return weights_from_tensors(tensors, config, weights_path)


def check_supported(config: dict, config_path: Path) -> None:
    """Refuse adapter types and options that plain LoRA would silently get wrong."""
    if config.get("peft_type", "LORA") != "LORA":
        raise RankwiseError(f"'{config_path}' is a {config['peft_type']} adapter, not LoRA")
    for option, plain in UNSUPPORTED.items():
        if config.get(option, plain) not in (plain, [], {}):
            raise RankwiseError(
                f"'{config_path}' sets {option}={config[option]!r}, which rankwise does not support"
            )


def weights_from_tensors(
    tensors: dict[str, torch.Tensor], config: dict, source: Path
) -> LoraWeights:
    """Pair PEFT's A/B tensors per module and attach the alphas the config assigns."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise RankwiseError(f"'{source}' holds tensor '{key}', which is not a LoRA A/B weight")
        pairs.setdefault(match[1], {})[PARTS[match[2]]] = tensor
    dora = bool(config.get("use_dora", False))
    kasa = config.get("kasa_config")
    factors, magnitudes, diagonals = {}, {}, {}
    for module, pair in pairs.items():
        missing = {"A", "B"} - set(pair)
        if missing:
            raise RankwiseError(f"'{source}' has lora_{missing.pop()} missing for {module}")
        if ("magnitude" in pair) != dora:
            raise RankwiseError(
                f"'{source}': {module} {'has' if 'magnitude' in pair else 'lacks'} a DoRA "
                f"magnitude vector, but the config sets use_dora={dora}"
            )
        if dora:
            magnitudes[module] = pair["magnitude"]
        if ("diagonal" in pair) != bool(kasa):
            raise RankwiseError(
                f"'{source}': {module} {'has' if 'diagonal' in pair else 'lacks'} a KaSA "
                f"lora_diag, but the config {'sets' if kasa else 'has no'} kasa_config"
            )
        if kasa:
            diagonals[module] = pair["diagonal"]
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise RankwiseError(
                f"'{source}': {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                "which do not form a low-rank pair"
            )
        factors[module] = (a, b)
    if not factors:
        raise RankwiseError(f"'{source}' holds no LoRA weights")
    alpha_pattern = config.get("alpha_pattern") or {}
    alphas = {}
    for module in factors:
        key = pattern_key(alpha_pattern, module)
        alphas[module] = float(alpha_pattern[key] if key else config.get("lora_alpha", 8))
    return LoraWeights(
        factors=factors,
        alphas=alphas,
        use_rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout", 0.0)),
        base_model=config.get("base_model_name_or_path"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        magnitudes=magnitudes,
        diagonals=diagonals,
        kasa=(float(kasa["beta"]), float(kasa["gamma"])) if kasa else PENALTIES,
    )


def write_adapter(weights: LoraWeights, path: str | os.PathLike) -> Path:
    """Write ``weights`` as a PEFT adapter folder; files are replaced atomically."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in weights.factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().cpu()
    for module, magnitude in weights.magnitudes.items():
        tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = magnitude.detach().contiguous().cpu()
    for module, diagonal in weights.diagonals.items():
        tensors[f"{PREFIX}{module}.lora_diag"] = diagonal.detach().contiguous().cpu()
    atomic_file(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    text = json.dumps(peft_config(weights), indent=2, sort_keys=True)
    atomic_file(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return folder


def peft_config(weights: LoraWeights) -> dict:
    """PEFT's ``adapter_config.json`` fields for these weights.

    r and lora_alpha are the most common values; modules that differ are listed by full name in
    rank_pattern / alpha_pattern (PEFT matches a pattern at the end of a dotted name).
    """
    modules = list(weights.factors)
    ranks = {m: weights.rank(m) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(weights.alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": weights.base_model,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: a for m, a in weights.alphas.items() if a != alpha},
        "target_modules": modules,
        "use_rslora": weights.use_rslora,
        "use_dora": bool(weights.magnitudes),
        "kasa_config": (
            {"beta": weights.kasa[0], "gamma": weights.kasa[1]} if weights.diagonals else None
        ),
        "lora_dropout": weights.dropout,
        "bias": "none",
        "fan_in_fan_out": weights.fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
