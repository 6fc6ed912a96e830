"""Shared by the bench scripts: the machine line, writing a table into docs/benchmarks.md, and
PEFT trained under rankwise's training loop (the baseline of several scripts).

Each script owns one section of docs/benchmarks.md, delimited by HTML comments carrying its
name, and rewrites only that section, so scripts can be re-run in any order.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rankwise.data import collate
from rankwise.models import LoadedModel
from rankwise.train import TrainConfig
from rankwise.train.distributed import World
from rankwise.train.examples import batch_indices, build_examples, label_tokens
from rankwise.train.loss import summed_loss
from rankwise.train.schedule import learning_rate


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since its start or ``reset_peak_rss`` (Linux's
    VmHWM; ``ru_maxrss`` would carry over the parent's peak through fork and exec)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def reset_peak_rss() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise), then start
    ``peak_rss_mb`` again from the current resident memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery table below is written by the bench/ script named in its heading.\n"


def machine() -> str:
    """One line naming the machine: CPU, cores, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table from headers and rows (values formatted with str)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md with ``body``."""
    text = DOCS.read_text() if DOCS.exists() else HEADER
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def train_peft(
    loaded: LoadedModel,
    config: TrainConfig,
    lora_config: object,
    after_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, float]:
    """PEFT's adapter (``lora_config``, a ``peft.LoraConfig``) trained with rankwise's loop: the
    same examples, batches, summed-token loss, AdamW, learning-rate schedule and clipping.

    Returns the adapted inner model (a plain causal LM) and the training tokens/s;
    ``after_step(done, model)`` runs after each step, outside the timing.
    """
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    inner = get_peft_model(loaded.model, lora_config).base_model.model
    examples, _ = build_examples(config.data, loaded.tokenizer, config, "train", World())
    params = [p for p in inner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    tokens, seconds = 0, 0.0
    for step in range(config.max_steps):
        inner.train()
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step, config.lr, config.warmup_steps, config.max_steps, config.schedule
            )
        batch = [
            examples[i] for i in batch_indices(step, config.batch_size, len(examples), config.seed)
        ]
        chunk = collate(batch, loaded.tokenizer.pad_token_id)
        (summed_loss(inner, chunk) / label_tokens(batch)).backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(chunk["attention_mask"].sum())
        seconds += time.perf_counter() - start
        if after_step is not None:
            inner.eval()
            after_step(step + 1, inner)
    inner.eval()
    return inner, tokens / max(seconds, 1e-9)
