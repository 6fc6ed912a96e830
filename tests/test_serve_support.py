"""Builders shared by the serving tests: a tiny character-level model, random adapters and a
live ``rankwise serve`` subprocess."""

from __future__ import annotations

import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rankwise.adapters.inject import adaptable_modules
from rankwise.adapters.peft_format import LoraWeights, write_adapter
from rankwise.architectures import is_transposed, linear_shape

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, so any id sequence decodes to distinct text."""
    chars = SPECIALS + list(string.ascii_letters + string.digits + " .,:;!?-'\n")
    core = Tokenizer(BPE({c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A random two-layer Llama (fp32, eval, frozen) with a 256-token context."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def random_adapter(
    model: torch.nn.Module,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] | None = ("q_proj", "v_proj"),
    rank_pattern: dict[str, int] | None = None,
    alpha: float = 8.0,
) -> LoraWeights:
    """A LoRA adapter with random A and B (B non-zero, so it changes the output).

    ``targets`` are module kinds (q_proj, c_attn, ...); None adapts every linear layer.
    """
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, linear in adaptable_modules(model).items():
        kind = name.rpartition(".")[2]
        if targets is None or kind in targets:
            r = (rank_pattern or {}).get(kind, rank)
            fan_in, fan_out = linear_shape(linear)
            a = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
            b = torch.randn(fan_out, r, generator=gen) * 0.5
            factors[name] = (a, b)
    transposed = any(is_transposed(m) for m in adaptable_modules(model).values())
    return LoraWeights(
        factors, {m: alpha for m in factors}, base_model="tiny", fan_in_fan_out=transposed
    )


def greedy_text(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompt: list[int], n: int
) -> str:
    """The text of ``n`` greedy tokens from ``model.generate``, EOS an ordinary token."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def write_tiny_model(folder: Path) -> LlamaForCausalLM:
    """Save a tiny model and its tokenizer as a Hugging Face folder; returns the model."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def write_adapters(folder: Path, model: torch.nn.Module, count: int) -> list[str]:
    """Write ``count`` adapters of mixed ranks and targets as PEFT folders named a0, a1, ..."""
    names = []
    for i in range(count):
        targets = ("q_proj", "v_proj") if i % 2 else ("q_proj", "v_proj", "down_proj")
        weights = random_adapter(model, seed=100 + i, rank=2 + 2 * (i % 3), targets=targets)
        write_adapter(weights, folder / f"a{i}")
        names.append(f"a{i}")
    return names


class Server:
    """A ``rankwise serve`` subprocess and its base URL."""

    def __init__(self, root: Path, *flags: str):
        command = [
            sys.executable,
            "-m",
            "rankwise.commands.serve",
            "--model",
            str(root / "model"),
            "--adapters",
            str(root / "adapters"),
            "--port",
            "0",
            "--log-level",
            "warning",
            "--threads",
            "1",
            *flags,
        ]
        self.log = root / f"server-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True
        )
        timer = threading.Timer(60, self.proc.kill)  # never hang the test run on a bad start
        timer.start()
        line = self.proc.stdout.readline()
        timer.cancel()
        assert "http://" in line, f"server did not start: {line!r} {self.log.read_text()}"
        self.url = line.strip().rsplit(" ", 1)[-1]

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
