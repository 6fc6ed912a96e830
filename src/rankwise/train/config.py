"""The training configuration: one typed dataclass; YAML keys and CLI flags are its field names."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from rankwise.adapters import LoraConfig
from rankwise.configfile import load_yaml
from rankwise.errors import RankwiseError

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint to resume it exactly."""

    data: str = "task:reverse_words"  # a path, task:NAME[,NAME...] / task:all, corpus:python-docs
    output_dir: str = "runs/adapter"  # the PEFT adapter, checkpoints/, metrics.jsonl, loss.png
    model: str | None = None  # HF folder or .gguf file; None is the embedded SmolLM2
    eval_data: str | None = None  # validation data; None takes the validation split of `data`
    # (a path given as `data` has no split: then validation is skipped unless eval_data is set)
    train_examples: int = 2000  # examples generated per task (task: data only)
    eval_examples: int = 64  # validation examples per task (task: data only)
    skip_bad_lines: bool = (
        False  # skip malformed data lines (and report how many) instead of failing
    )
    seq_len: int = 256  # truncation length; the block length when packing plain text
    # adapter
    r: int = 16  # LoRA rank
    lora_alpha: float = 32.0  # LoRA alpha: scaling alpha / r
    target_modules: list[str] | str = "all-linear"  # module names, a regex, or all-linear
    lora_dropout: float = 0.0  # dropout on the adapter input
    use_rslora: bool = False  # alpha / sqrt(r) scaling
    init: str = "init_a"  # init_a (A random, B zero), init_b, gaussian
    # optimisation
    max_steps: int = 300  # optimizer steps
    batch_size: int = 8  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 20  # linear warm-up from 0 to lr
    schedule: str = "cosine"  # decay after warm-up: cosine, linear or constant
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    seed: int = 0  # adapter init, data order and dropout
    dtype: str = "float32"  # the frozen base's dtype: float32 or bfloat16 (adapters stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # bookkeeping
    log_every: int = 10  # steps between metric lines
    eval_every: int = 100  # steps between validation losses (0 disables)
    save_every: int = 100  # steps between checkpoints (0: only the final one)
    keep_last: int = 2  # checkpoints kept on disk

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise RankwiseError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise RankwiseError("dtype must be float32 or bfloat16")
        positive = ("max_steps", "batch_size", "grad_accum", "seq_len", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise RankwiseError(f"{name} must be at least 1")
        if self.lr <= 0:
            raise RankwiseError("lr must be positive")
        self.lora()  # validates the adapter settings

    def lora(self) -> LoraConfig:
        """The adapter settings as a ``LoraConfig``."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            init=self.init,
        )

    @property
    def output(self) -> Path:
        return Path(self.output_dir)


def from_mapping(values: dict, cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Build a config (of ``cls``, a TrainConfig subclass) from a mapping; unknown keys fail."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RankwiseError(
            f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as err:
        raise RankwiseError(f"bad config: {err}") from err


def add_config_flags(parser: argparse.ArgumentParser, cls: type[TrainConfig] = TrainConfig) -> None:
    """One ``--flag`` per config field (same name, dashes for underscores), default unset."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = scalar_type(hints[f.name])
        if f.name == "target_modules":
            parser.add_argument(flag, dest=f.name, default=None, help="comma-separated or regex")
        elif kind is bool:
            parser.add_argument(flag, dest=f.name, type=parse_bool, default=None, metavar="BOOL")
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None)


def scalar_type(hint: object) -> type:
    """int, float or bool for such fields (optional ones included); str for the rest."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (bool, int, float) else str


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(args: argparse.Namespace, cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """YAML file values (if any) overridden by every flag given on the command line."""
    values = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if value is not None:
            if f.name == "target_modules" and "," in value:
                value = value.split(",")
            values[f.name] = value
    return from_mapping(values, cls)
