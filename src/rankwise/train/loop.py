"""The training loop: AdamW on the adapter, warm-up + decay, accumulation, clipping, resume.

The run is a pure function of its config: the adapter init, the data order (a permutation per
epoch seeded by ``seed + epoch``) and dropout all derive from ``seed``, and the data position is
``step * global_batch``. So a run resumed from any checkpoint ends bit for bit like one that was
never interrupted.

The loss of an optimizer step is the mean cross-entropy over every label token of the global
batch (all micro-batches on all processes), so the gradient does not depend on how the batch
is split across accumulation steps or processes.
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

from rankwise.adapters import (
    copy_factors,
    describe_trainable,
    expert_layers,
    inject_adapter,
    read_adapter,
    save_adapter,
)
from rankwise.architectures import head_logits
from rankwise.data import IGNORE_INDEX, collate, encode_example, load_dataset_spec, pack_texts
from rankwise.errors import RankwiseError
from rankwise.models import load_model
from rankwise.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rankwise.train.config import TrainConfig
from rankwise.train.distributed import World, all_reduce_sum, barrier, init_world
from rankwise.train.metrics import MetricsLog, plot_loss
from rankwise.train.schedule import learning_rate

HEAD_ROWS = 128  # output-head rows per loss piece (1.5x faster than one piece on a 2-core CPU)

Example = dict[str, list[int]]


def attach_lora(model: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    """The default recipe: inject one fresh LoRA adapter; returns its parameters."""
    inject_adapter(model, config.lora())
    return [p for layer in expert_layers(model).values() for p in layer.adapter_params().values()]


def no_aux_loss(model: torch.nn.Module) -> torch.Tensor:
    return torch.zeros(())


def nothing_after_step(model: torch.nn.Module) -> None:
    return None


def write_lora(model: torch.nn.Module, folder: Path, base_name: str) -> None:
    save_adapter(model, folder, base_model=base_name)


@torch.no_grad()
def read_lora(model: torch.nn.Module, folder: Path) -> None:
    """Copy a saved adapter's factors into the model's (already injected) layers."""
    weights, layers = read_adapter(folder), expert_layers(model)
    missing = sorted(set(layers) - set(weights.factors))
    if missing:
        raise RankwiseError(f"checkpoint '{folder}' has no weights for {missing[0]}")
    copy_factors(layers, [weights])


@dataclass(frozen=True)
class TrainHooks:
    """What another recipe (mixtures of experts) changes in the loop; defaults train one LoRA."""

    # builds the trainable modules on the loaded model, returns the parameters to optimise
    attach: Callable[[torch.nn.Module, TrainConfig], list[torch.nn.Parameter]] = attach_lora
    # an extra loss of the last forward, added to each micro-batch's loss (a mean over them)
    aux_loss: Callable[[torch.nn.Module], torch.Tensor] = no_aux_loss
    after_step: Callable[[torch.nn.Module], None] = nothing_after_step  # after optimizer.step
    # writes the trained weights into a folder (checkpoints and the final result)
    write: Callable[[torch.nn.Module, Path, str], None] = write_lora
    read: Callable[[torch.nn.Module, Path], None] = read_lora  # restores them on --resume


@dataclass
class TrainResult:
    """What a finished run reports, with the trained model (adapters attached) for further use."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter_dir: Path
    steps: int
    final_loss: float
    val_loss: float | None
    tokens_per_second: float
    seconds: float


def build_examples(
    spec: str, tokenizer, config: TrainConfig, split: str, n: int
) -> tuple[list[Example], int]:
    """Tokenised examples for a data spec, and how many malformed lines were skipped.

    Plain text records are packed into ``seq_len`` blocks; prompt/completion and chat records
    become one example each, with labels only on what the model should write.
    """
    records = load_dataset_spec(spec, split=split, n=n, skip_bad_lines=config.skip_bad_lines)
    texts = [r["text"] for r in records.records if "text" in r]
    examples = (
        [
            {"input_ids": block, "labels": list(block)}
            for block in pack_texts(texts, tokenizer, config.seq_len)
        ]
        if texts
        else []
    )
    for record in records.records:
        if "text" not in record:
            example = encode_example(record, tokenizer, config.seq_len)
            if any(label != IGNORE_INDEX for label in example["labels"][1:]):
                examples.append(example)
    if not examples:
        raise RankwiseError(
            f"'{spec}' gave no trainable examples (texts shorter than seq_len={config.seq_len}?)"
        )
    return examples, records.skipped


def validation_spec(config: TrainConfig) -> str | None:
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
    piece's fp32 logits stay in cache through the softmax and its backward.
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
def validation_loss(model: torch.nn.Module, examples: list[Example], batch_size: int, pad: int):
    """Mean next-token loss over all label tokens of ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        total += summed_loss(model, collate(chunk, pad)).item()
        count += label_tokens(chunk)
    model.train(was_training)
    return total / max(count, 1)


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


def train(
    config: TrainConfig, resume: bool = False, hooks: TrainHooks | None = None
) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and write it to ``config.output_dir``.

    ``hooks`` let other recipes (mixtures) reuse the loop; the default trains one LoRA.
    """
    hooks = hooks or TrainHooks()
    world = init_world()
    output = config.output
    checkpoints = list_checkpoints(output)
    if resume and not checkpoints:
        raise RankwiseError(f"--resume: no checkpoint under '{output}/checkpoints' to resume from")
    if not resume and checkpoints:
        raise RankwiseError(
            f"'{output}' already holds checkpoints: pass --resume to continue, or a new output_dir"
        )
    loaded = load_model(config.model, config.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(config.seed)
    params = hooks.attach(model, config)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    examples, skipped = build_examples(
        config.data, tokenizer, config, "train", config.train_examples
    )
    spec = validation_spec(config)
    val_examples = (
        build_examples(spec, tokenizer, config, "validation", config.eval_examples)[0]
        if spec
        else []
    )
    start_step = 0
    if resume:
        state = load_checkpoint(checkpoints[-1], optimizer, lambda f: hooks.read(model, f))
        check_same_run(state["config"], config)
        start_step = state["step"]
    if world.is_main:
        output.mkdir(parents=True, exist_ok=True)
        print(f"{len(examples)} training examples from {config.data}", end="")
        print(f" ({skipped} malformed lines skipped)" if skipped else "")
        print(describe_trainable(model))
    metrics = MetricsLog(output / "metrics.jsonl", start_step) if world.is_main else None
    result = run_steps(
        model,
        tokenizer,
        optimizer,
        params,
        examples,
        val_examples,
        config,
        world,
        start_step,
        metrics,
        loaded.name,
        hooks,
    )
    if world.is_main:
        hooks.write(model, output, loaded.name)
        plot_loss(output / "metrics.jsonl", output / "loss.png")
    barrier(world)
    return result


def check_same_run(saved: dict, config: TrainConfig) -> None:
    """A checkpoint resumes only the run that wrote it (max_steps and bookkeeping may differ)."""
    free = {"max_steps", "log_every", "eval_every", "save_every", "keep_last", "output_dir"}
    changed = [k for k, v in saved.items() if k not in free and getattr(config, k) != v]
    if changed:
        raise RankwiseError(f"cannot resume: the config differs from the checkpoint's in {changed}")


def run_steps(
    model,
    tokenizer,
    optimizer,
    params,
    examples,
    val_examples,
    config: TrainConfig,
    world: World,
    start_step: int,
    metrics: MetricsLog | None,
    base_name: str,
    hooks: TrainHooks,
) -> TrainResult:
    """Optimizer steps ``start_step`` .. ``max_steps`` with logging, validation and checkpoints."""
    model.train()
    pad_id = tokenizer.pad_token_id
    micro = config.batch_size
    global_batch = micro * config.grad_accum * world.size
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        disable=not world.is_main,
        desc="train",
        dynamic_ncols=True,
    )
    started, tokens_seen, loss_value, val = time.perf_counter(), 0, float("nan"), None
    for step in range(start_step, config.max_steps):
        indices = batch_indices(step, global_batch, len(examples), config.seed)
        batch = [examples[i] for i in indices]
        denominator = max(label_tokens(batch), 1)
        mine = batch[world.rank :: world.size]  # this process's shard of the global batch
        lr = learning_rate(step, config.lr, config.warmup_steps, config.max_steps, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros(())
        shares = math.ceil(len(mine) / micro) * world.size  # aux: mean over all micro-batches
        for start in range(0, len(mine), micro):
            chunk = collate(mine[start : start + micro], pad_id)
            loss = summed_loss(model, chunk) / denominator
            (loss + hooks.aux_loss(model) / shares).backward()
            loss_sum += loss.detach()
            tokens_seen += int(chunk["attention_mask"].sum()) * world.size
        all_reduce_sum([p.grad for p in params if p.grad is not None] + [loss_sum], world)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            last = list_checkpoints(config.output)
            raise RankwiseError(
                f"the loss became {loss_value} at step {step + 1}; stopped without saving. "
                f"Last good checkpoint: {last[-1] if last else 'none'} (try a lower lr)"
            )
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_step(model)
        done = step + 1
        speed = tokens_seen / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
        if metrics and (done % config.log_every == 0 or done == config.max_steps):
            metrics.write(step=done, loss=loss_value, lr=lr, tokens_per_s=speed)
        if (
            val_examples
            and config.eval_every
            and (done % config.eval_every == 0 or done == config.max_steps)
        ):
            val = validation_loss(model, val_examples, micro, pad_id)
            if metrics:
                metrics.write(step=done, val_loss=val)
                bar.write(f"step {done}: validation loss {val:.4f}")
        if world.is_main and (
            (config.save_every and done % config.save_every == 0) or done == config.max_steps
        ):
            save_checkpoint(
                config.output,
                done,
                optimizer,
                config,
                config.keep_last,
                lambda folder: hooks.write(model, folder, base_name),
            )
        barrier(world)
    bar.close()
    elapsed = time.perf_counter() - started
    return TrainResult(
        model,
        tokenizer,
        config.output,
        config.max_steps,
        loss_value,
        val,
        tokens_seen / max(elapsed, 1e-9),
        elapsed,
    )
