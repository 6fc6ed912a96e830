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
from typing import Protocol

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rankwise.adapters import (
    copy_factors,
    describe_trainable,
    inject_adapter,
    read_adapter,
    save_adapter,
)
from rankwise.architectures import head_logits
from rankwise.data import (
    IGNORE_INDEX,
    collate,
    encode_example,
    eos_id,
    load_dataset_spec,
    pack_tokens,
    tokenize_texts,
)
from rankwise.errors import RankwiseError
from rankwise.models import load_model, model_device, resolve_device
from rankwise.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rankwise.train.config import RunConfig, TrainConfig
from rankwise.train.distributed import (
    World,
    accumulating,
    all_reduce_sum,
    barrier,
    data_parallel,
    init_world,
    shard_map,
)
from rankwise.train.metrics import MetricsLog, plot_loss
from rankwise.train.schedule import learning_rate

HEAD_ROWS = 128  # output-head rows per loss piece (1.5x faster than one piece on a 2-core CPU)

Example = dict[str, list[int]]


class Trainable(Protocol):
    """What the loop trains: its parameters, an auxiliary loss, step bookkeeping, save, load."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""
        ...

    def aux_loss(self) -> torch.Tensor:
        """An extra loss of the last forward (a zero tensor when there is none)."""
        ...

    def after_step(self, world: World) -> None:
        """Bookkeeping after each optimizer step (with the processes to agree with)."""
        ...

    def save(self, folder: Path, base_model: str) -> None:
        """Write the trained weights into ``folder`` (checkpoints and the final result)."""
        ...

    def load(self, folder: Path) -> None:
        """Restore the weights ``save`` wrote (on ``--resume``)."""
        ...


class LoraAdapter:
    """The default ``Trainable``: one fresh LoRA adapter, saved in PEFT's format."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig):
        self.model = model
        self.layers = inject_adapter(model, config.lora())
        self.device = model_device(model)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.adapter_params().values()]

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def after_step(self, world: World) -> None:
        return None

    def save(self, folder: Path, base_model: str) -> None:
        save_adapter(self.model, folder, base_model=base_model)

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        weights = read_adapter(folder)
        missing = sorted(set(self.layers) - set(weights.factors))
        if missing:
            raise RankwiseError(f"checkpoint '{folder}' has no weights for {missing[0]}")
        copy_factors(self.layers, [weights])


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
    attach: Callable[[torch.nn.Module, RunConfig], Trainable] = LoraAdapter,
) -> TrainResult:
    """Train what ``attach(model, config)`` puts on the model and write it to ``output_dir``."""
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
    loaded = load_model(config.model, config.dtype, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(config.seed)
    trainable = attach(model, config)
    params = trainable.parameters()
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
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
            group["lr"] = lr
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


def build_examples(
    spec: str, tokenizer: PreTrainedTokenizerBase, config: RunConfig, split: str, world: World
) -> tuple[list[Example], int]:
    """Tokenised examples for a data spec, and how many malformed lines were skipped.

    Plain text records are packed into ``seq_len`` blocks; prompt/completion and chat records
    become one example each, with labels only on what the model should write. Each process
    tokenises every ``world.size``-th record and the results are exchanged.
    """
    n = config.train_examples if split == "train" else config.eval_examples
    records = load_dataset_spec(spec, split=split, n=n, skip_bad_lines=config.skip_bad_lines)
    texts = [r["text"] for r in records.records if "text" in r]
    prompted = [r for r in records.records if "text" not in r]
    pieces = shard_map(lambda text: tokenize_texts([text], tokenizer)[0], texts, world)
    encoded = shard_map(lambda r: encode_example(r, tokenizer, config.seq_len), prompted, world)
    examples = (
        [
            {"input_ids": block, "labels": list(block)}
            for block in pack_tokens(pieces, eos_id(tokenizer), config.seq_len)
        ]
        if texts
        else []
    )
    examples += [e for e in encoded if any(label != IGNORE_INDEX for label in e["labels"][1:])]
    if not examples:
        raise RankwiseError(
            f"'{spec}' gave no trainable examples (texts shorter than seq_len={config.seq_len}?)"
        )
    return examples, records.skipped


def validation_spec(config: RunConfig) -> str | None:
    """The data to validate on: eval_data, else the validation split of a built-in source."""
    if config.eval_data:
        return config.eval_data
    return config.data if config.data.split(":")[0] in ("task", "corpus") else None


def label_tokens(batch: list[Example]) -> int:
    """Tokens the loss is taken over (labels shifted by one, as the model predicts the next)."""
    return sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in batch)


def summed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over the label tokens of a padded batch.

    The output head runs only at positions that carry a label, which on prompt/completion data
    skips most of its (vocabulary-sized) work, and in pieces of ``HEAD_ROWS`` rows, so that each
    piece's fp32 logits stay in cache through the softmax and its backward. The logits are the
    model's own (``head_logits``: Gemma2's soft-capping included).
    """
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    pieces = zip(hidden[:, :-1][keep].split(HEAD_ROWS), targets[keep].split(HEAD_ROWS), strict=True)
    return sum(
        torch.nn.functional.cross_entropy(head_logits(model, h), t, reduction="sum")
        for h, t in pieces
    )


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, examples: list[Example], batch_size: int, pad: int, world: World
) -> float:
    """Mean next-token loss over all label tokens of ``examples``, each process taking a share."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, label tokens)
    mine = examples[world.rank :: world.size]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
        totals[0] += summed_loss(model, batch).double()
        totals[1] += label_tokens(chunk)
    all_reduce_sum([totals], world)
    model.train(was_training)
    return (totals[0] / totals[1].clamp_min(1)).item()


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: consecutive slices of per-epoch permutations."""
    indices: list[int] = []
    position = step * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(global_batch - len(indices), n - offset)
        indices += order[offset : offset + take].tolist()
        position += take
    return indices


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
