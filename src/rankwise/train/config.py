"""Training configurations: YAML keys and CLI flags are their field names (``rankwise.options``).

``RunConfig`` is what every training run shares (data, optimisation, bookkeeping, the base
model); ``TrainConfig`` adds one LoRA adapter's settings for ``rankwise train``, and
``rankwise mix train`` adds a router's (``rankwise.mixture.MixConfig``). A checkpoint stores
the whole config, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rankwise.adapters import LoraConfig
from rankwise.errors import RankwiseError
from rankwise.models import ModelOptions
from rankwise.options import option

SCHEDULES = ("cosine", "linear", "constant")
TRAIN_DTYPES = ("float32", "bfloat16", "auto")
POSITIVE = "[1, inf)"


@dataclass
class RunConfig(ModelOptions):
    """What every training run depends on besides what it trains."""

    data: str = option(
        "task:reverse_words",
        "training data: a path, task:NAME[,NAME...], task:all or corpus:python-docs",
    )
    output_dir: str = option(
        "runs/adapter", "folder for the result, checkpoints/, metrics.jsonl and loss.png"
    )
    eval_data: str | None = option(
        None,
        "validation data (unset: the validation split of a built-in `data`; a path given as "
        "`data` has no split, so validation is then skipped)",
    )
    train_examples: int = option(2000, "examples generated per task (task: data)", within=POSITIVE)
    eval_examples: int = option(64, "validation examples per task (task: data)", within=POSITIVE)
    skip_bad_lines: bool = option(
        False, "skip malformed data lines (and report how many) instead of stopping"
    )
    seq_len: int = option(
        256, "truncation length; the block length when packing plain text", within=POSITIVE
    )
    max_steps: int = option(300, "optimizer steps", within=POSITIVE)
    batch_size: int = option(8, "examples per micro-batch per process", within=POSITIVE)
    grad_accum: int = option(1, "micro-batches per optimizer step", within=POSITIVE)
    lr: float = option(2e-4, "peak learning rate of AdamW", within="(0, inf)")
    loraplus_lr_ratio: float = option(
        1.0,
        "LoRA+: the B factors learn this many times faster than lr (arXiv 2402.12354)",
        within="(0, inf)",
    )
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay", within="[0, inf)")
    warmup_steps: int = option(20, "linear warm-up from 0 to lr", within="[0, inf)")
    schedule: str = option("cosine", "decay after warm-up", choices=SCHEDULES)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)", within="[0, inf)")
    seed: int = option(0, "seeds the adapter init, the data order and dropout")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass to save memory"
    )
    log_every: int = option(10, "steps between metric lines", within=POSITIVE)
    eval_every: int = option(100, "steps between validation losses (0 disables)", within="[0, inf)")
    save_every: int = option(
        100, "steps between checkpoints (0: only the final one)", within="[0, inf)"
    )
    keep_last: int = option(2, "checkpoints kept on disk", within=POSITIVE)

    def check(self) -> None:
        super().check()
        if self.dtype not in TRAIN_DTYPES:
            raise RankwiseError(
                "dtype must be float32, bfloat16 or auto (adapters always train in fp32)"
            )

    @property
    def output(self) -> Path:
        return Path(self.output_dir)


@dataclass
class TrainConfig(LoraConfig, RunConfig):
    """``rankwise train``: a run that trains one LoRA adapter (``LoraConfig``'s settings).

    The two bases declare disjoint settings, so neither changes the other's defaults.
    """

    calib: str | None = option(
        None,
        "calibration data of data-driven inits (eva, corda_ipm: the task's; corda_kpm: what "
        "to keep): a data spec or path (unset: the training data)",
    )
    calib_samples: int = option(
        32, "calibration blocks of seq_len tokens for data-driven inits", within="[1, inf)"
    )
    eva_rho: float = option(
        2.0, "eva: a layer may take up to round(r * rho) of the rank budget", within="[1, inf)"
    )
    eva_tau: float = option(
        0.99,
        "eva: stop reading calibration data once components move less (|cos| >= tau)",
        within="[0, 1]",
    )
    init_adapter: str | None = option(
        None,
        "start from this PEFT adapter folder (a LoftQ, LQ-LoRA or EoRA output's adapter/): its "
        "modules, ranks and alphas replace r, lora_alpha and target_modules",
    )

    def check(self) -> None:
        super().check()
        if self.init_adapter and (
            self.init != "init_a" or self.use_dora or self.lori_seed is not None or self.l4q_bits
        ):
            raise RankwiseError(
                "init_adapter gives the factors their start: use it without init, use_dora, "
                "lori_seed or l4q_bits"
            )

    def lora(self) -> LoraConfig:
        """The adapter settings alone."""
        return LoraConfig.from_mapping(
            {name: getattr(self, name) for name in LoraConfig.__dataclass_fields__}
        )
