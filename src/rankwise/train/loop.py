"""The training loop: AdamW on what a recipe attaches, warm-up + decay, accumulation, resume.

The run is a pure function of its config: the adapter init, the data order (a permutation per
epoch seeded by ``seed + epoch``) and dropout all derive from ``seed``, and the data position is
``step * global_batch``. So a run resumed from any checkpoint ends bit for bit like one that was
never interrupted.

The loss of an optimizer step is the mean cross-entropy over every label token of the global
batch (all micro-batches on all processes), so the gradient does not depend on how the batch
is split across accumulation steps or processes.

What is trained is a ``Trainable``: a plain LoRA adapter (``LoraAdapter``, the default) or a
mixture of experts (``rankwise.mixture``); the loop never looks inside it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rankwise.adapters import describe_trainable
from rankwise.data import collate
from rankwise.errors import RankwiseError
from rankwise.models import LoadedModel, load_model, model_device, resolve_device
from rankwise.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rankwise.train.config import RunConfig
from rankwise.train.distributed import (
    World,
    accumulating,
    all_reduce_sum,
    barrier,
    data_parallel,
    init_world,
)
from rankwise.train.examples import (
    Example,
    batch_indices,
    build_examples,
    label_tokens,
    validation_spec,
)
from rankwise.train.loss import summed_loss, validation_loss
from rankwise.train.metrics import MetricsLog, plot_loss
from rankwise.train.schedule import learning_rate
from rankwise.train.trainable import LoraAdapter, Trainable


@dataclass
class TrainResult:
    """What a finished run reports, with the trained model (adapters attached) for further use."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    trained: Trainable  # what was trained (the adapter or the mixture), on ``model``
    adapter_dir: Path
    steps: int
    final_loss: float
    val_loss: float | None
    tokens_per_second: float
    seconds: float


class BatchLoss(torch.nn.Module):
    """The summed token loss of a batch as a module's forward, so that DDP can wrap it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(self.model, batch)


def train(
    config: RunConfig,
    resume: bool = False,
    attach: Callable[[LoadedModel, RunConfig], Trainable] = LoraAdapter,
    loaded: LoadedModel | None = None,
) -> TrainResult:
    """Train what ``attach(loaded, config)`` puts on the model and write it to ``output_dir``.

    ``loaded``: a model already in memory (a federated client reuses its cached base) instead
    of loading ``config.model``.
    """
    device = resolve_device(config.device)
    world = init_world(device)
    output = config.output
    checkpoints = list_checkpoints(output)
    if resume and not checkpoints:
        raise RankwiseError(f"--resume: no checkpoint under '{output}/checkpoints' to resume from")
    if not resume and checkpoints:
        raise RankwiseError(
            f"'{output}' already holds checkpoints: pass --resume to continue, or a new output_dir"
        )
    loaded = loaded or load_model(
        config.model, config.dtype, device, quantize=config.quantize, quant_block=config.quant_block
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(config.seed)
    trainable = attach(loaded, config)
    params = trainable.parameters()
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    optimizer = torch.optim.AdamW(
        parameter_groups(trainable, config.loraplus_lr_ratio),
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    examples, skipped = build_examples(config.data, tokenizer, config, "train", world)
    spec = validation_spec(config)
    val_examples = build_examples(spec, tokenizer, config, "validation", world)[0] if spec else []
    start_step = 0
    if resume:
        state = load_checkpoint(checkpoints[-1], optimizer, trainable.load)
        check_same_run(state["config"], config)
        start_step = state["step"]
    if world.is_main:
        output.mkdir(parents=True, exist_ok=True)
        print(f"{len(examples)} training examples from {config.data}", end="")
        print(f" ({skipped} malformed lines skipped)" if skipped else "")
        print(describe_trainable(model))
    metrics = MetricsLog(output / "metrics.jsonl", start_step) if world.is_main else None
    forward = data_parallel(BatchLoss(model), params, world)
    model.train()
    pad_id = tokenizer.pad_token_id
    global_batch = config.batch_size * config.grad_accum * world.size
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        disable=not world.is_main,
        desc="train",
        dynamic_ncols=True,
    )
    started, tokens_seen, loss_value, val = time.perf_counter(), 0, float("nan"), None
    for step in range(start_step, config.max_steps):
        lr = learning_rate(step, config.lr, config.warmup_steps, config.max_steps, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batch = [examples[i] for i in batch_indices(step, global_batch, len(examples), config.seed)]
        loss_total, tokens = accumulate_gradients(forward, trainable, batch, config, world, pad_id)
        # (a device scalar: its .item() below is the step's one synchronisation)
        tokens_seen += tokens
        all_reduce_sum([loss_total], world)
        loss_value = loss_total.item()
        if not math.isfinite(loss_value):
            last = list_checkpoints(output)
            raise RankwiseError(
                f"the loss became {loss_value} at step {step + 1}; stopped without saving. "
                f"Last good checkpoint: {last[-1] if last else 'none'} (try a lower lr)"
            )
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainable.after_step(world)
        done = step + 1
        speed = tokens_seen / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
        if metrics and (done % config.log_every == 0 or done == config.max_steps):
            metrics.write(step=done, loss=loss_value, lr=lr, tokens_per_s=speed)
        if val_examples and config.eval_every and due(done, config.eval_every, config.max_steps):
            val = validation_loss(model, val_examples, config.batch_size, pad_id, world)
            if metrics:
                metrics.write(step=done, val_loss=val)
                bar.write(f"step {done}: validation loss {val:.4f}")
        if world.is_main and due(done, config.save_every, config.max_steps):
            save_checkpoint(
                output,
                done,
                optimizer,
                config,
                config.keep_last,
                lambda folder: trainable.save(folder, loaded.name),
            )
        barrier(world)
    bar.close()
    elapsed = time.perf_counter() - started
    if world.is_main:
        trainable.save(output, loaded.name)
        plot_loss(output / "metrics.jsonl", output / "loss.png")
    barrier(world)
    return TrainResult(
        model,
        tokenizer,
        trainable,
        output,
        config.max_steps,
        loss_value,
        val,
        tokens_seen / max(elapsed, 1e-9),
        elapsed,
    )


def parameter_groups(trainable: Trainable, loraplus_ratio: float) -> list[dict]:
    """AdamW's parameter groups, each with its ``lr_scale`` (the schedule's lr times it).

    One group, or with LoRA+ (ratio != 1) the B factors in a second group at ``ratio`` times
    the learning rate of everything else (A, DoRA's magnitudes, routers), as the paper and
    PEFT's ``create_loraplus_optimizer`` do.
    """
    params = trainable.parameters()
    if loraplus_ratio == 1:
        return [{"params": params, "lr_scale": 1.0}]
    ups = {id(p) for p in trainable.up_factors()}
    groups = [
        {"params": [p for p in params if id(p) not in ups], "lr_scale": 1.0},
        {"params": [p for p in params if id(p) in ups], "lr_scale": loraplus_ratio},
    ]
    return [group for group in groups if group["params"]]


def accumulate_gradients(
    forward: torch.nn.Module,
    trainable: Trainable,
    batch: list[Example],
    config: RunConfig,
    world: World,
    pad_id: int,
) -> tuple[torch.Tensor, int]:
    """Backward over this process's micro-batches of one global batch.

    Returns this process's share of the step's loss (a device scalar) and the tokens it read
    (counted over all processes). Each micro-batch's loss is its summed token loss over the
    global batch's label count; auxiliary losses are averaged over all micro-batches of all
    processes. DDP averages gradients over processes, hence the factor ``world.size``.
    """
    denominator = max(label_tokens(batch), 1)
    mine = batch[world.rank :: world.size]  # this process's shard of the global batch
    starts = range(0, len(mine), config.batch_size)
    shares = len(starts) * world.size
    device = model_device(forward)
    loss_total = torch.zeros((), device=device)
    tokens = 0
    for number, start in enumerate(starts):
        chunk = collate(mine[start : start + config.batch_size], pad_id)
        tokens += int(chunk["attention_mask"].sum()) * world.size
        chunk = {k: v.to(device, non_blocking=True) for k, v in chunk.items()}
        with accumulating(forward, last=number == len(starts) - 1):
            loss = forward(chunk) / denominator
            ((loss + trainable.aux_loss() / shares) * world.size).backward()
        loss_total += loss.detach()
    return loss_total, tokens


def due(done: int, every: int, last: int) -> bool:
    """Whether step ``done`` is one of every ``every`` steps (0: never) or the last one."""
    return bool(every) and done % every == 0 or done == last


def check_same_run(saved: dict, config: RunConfig) -> None:
    """A checkpoint resumes only the run that wrote it (max_steps and bookkeeping may differ)."""
    free = {"max_steps", "log_every", "eval_every", "save_every", "keep_last", "output_dir"}
    free |= {"device"}  # a run may move to another device, as long as the maths is the same
    current = config.as_dict()
    changed = sorted(
        k for k in saved.keys() | current.keys() if k not in free and saved.get(k) != current.get(k)
    )
    if changed:
        raise RankwiseError(f"cannot resume: the config differs from the checkpoint's in {changed}")
