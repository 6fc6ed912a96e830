"""Which feature works on which architecture, measured on tiny random models built in code.

    python bench/families.py

For each family of tests/architectures.py (Llama, Qwen2, Qwen3, Mistral, Gemma2, Phi-3, GPT-2,
GPT-NeoX): LoRA on every linear layer trains (loss of the first and last of 8 steps), an
adapter written by PEFT loads here and one written here loads in PEFT (largest logit
difference either way, fp32), the same for DoRA, the serving engine's greedy text equals
``model.generate`` with the adapter attached (prompts up to 21 tokens, beyond the 8-token
sliding windows), SVD-LLM and A³ compress at ratio 0.25 (parameter change and logit error of
the compressed model), or the one-line refusal. Writes the table into docs/benchmarks.md
(section "architectures").
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from architectures import (  # noqa: E402
    ARCHITECTURES,
    save_tiny_model,
    tiny_model,
    train_tiny,
    word_tokenizer,
)
from common import machine, markdown_table, write_section  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

from rankwise.adapters import LoraConfig, inject_adapter, load_adapter, save_adapter  # noqa: E402
from rankwise.adapters.attach import attach_adapters  # noqa: E402
from rankwise.adapters.inject import count_parameters  # noqa: E402
from rankwise.compress import compress  # noqa: E402
from rankwise.errors import RankwiseError  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.serve.engine import Engine, EngineConfig  # noqa: E402
from rankwise.serve.requests import GenerationRequest  # noqa: E402

TOKENS = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
PROMPTS = [[1, 5, 6], [1, *range(10, 22)], [1, *range(30, 50)]]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def random_lora(arch: str, dora: bool = False, seed: int = 1) -> torch.nn.Module:
    model = tiny_model(arch)
    torch.manual_seed(seed)
    for layer in inject_adapter(model, LoraConfig(r=4, lora_alpha=8, use_dora=dora)).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def trains(arch: str, folder: Path) -> str:
    _, losses = train_tiny(arch, folder, steps=8)
    return f"{losses[0]:.2f} → {losses[-1]:.2f}"


def peft_parity(arch: str, folder: Path, dora: bool) -> str:
    """Largest |logit difference|: a PEFT adapter loaded here, and ours loaded in PEFT."""
    peft_config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora, init_lora_weights=False
    )
    theirs = get_peft_model(tiny_model(arch), peft_config).eval()
    theirs.save_pretrained(folder / "peft")
    ours = tiny_model(arch)
    load_adapter(ours, folder / "peft")
    first = (logits(ours) - logits(theirs)).abs().max().item()
    mine = random_lora(arch, dora)
    save_adapter(mine, folder / "ours")
    back = PeftModel.from_pretrained(tiny_model(arch), folder / "ours").eval()
    second = (logits(back) - logits(mine)).abs().max().item()
    return f"{max(first, second):.1e}"


def serve_parity(arch: str) -> str:
    """Greedy texts of the engine (base model and an adapter in one batch) against generate."""
    from rankwise.adapters import weights_from_model

    tokenizer = word_tokenizer()
    weights = weights_from_model(random_lora(arch))
    engine = Engine(tiny_model(arch), tokenizer, EngineConfig(max_rank=4))
    engine.register("a", weights)
    jobs = [(p, a) for p in PROMPTS for a in (None, "a")]
    texts = engine.generate(
        [GenerationRequest(p, a, max_tokens=10, ignore_eos=True) for p, a in jobs]
    )
    same = 0
    for (prompt, adapter), text in zip(jobs, texts, strict=True):
        model = tiny_model(arch)
        if adapter:
            attach_adapters(model, [weights])
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
            )
        same += text == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    return f"{same}/{len(jobs)} equal"


def compressed(arch: str, folder: Path, method: str) -> str:
    """Parameter change and relative logit error at ratio 0.25, or the refusal."""
    loaded = load_model(str(save_tiny_model(arch, folder / f"{method}-model")))
    before, reference = count_parameters(loaded.model)[1], logits(loaded.model)
    try:
        compress(loaded.model, loaded.tokenizer, method, 0.25, samples=4, seq_len=32)
    except RankwiseError as err:
        return f"refused: {str(err).split(';')[0]}"
    after = count_parameters(loaded.model)[1]
    error = (logits(loaded.model) - reference).norm() / reference.norm()
    return f"{after / before - 1:+.0%} params, logit error {error:.2f}"


def main() -> None:
    torch.set_num_threads(1)  # tiny models: one thread avoids wake-ups
    rows = []
    started = time.perf_counter()
    for arch in ARCHITECTURES:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            row = [
                arch,
                trains(arch, folder),
                peft_parity(arch, folder / "lora", dora=False),
                peft_parity(arch, folder / "dora", dora=True),
                serve_parity(arch),
                compressed(arch, folder, "svd-llm"),
                compressed(arch, folder, "a3"),
            ]
        rows.append(row)
        print(" | ".join(row), flush=True)
    headers = [
        "architecture",
        "LoRA all-linear: loss step 1 → 8",
        "PEFT parity, max abs Δ logit",
        "DoRA PEFT parity",
        "serve = generate",
        "svd-llm 0.25",
        "a3 0.25",
    ]
    body = (
        "## Features per architecture (`bench/families.py`)\n\n"
        f"Machine: {machine()}. Tiny random models of each family (hidden 32, 2 layers, "
        "tests/architectures.py), fp32; parity is both ways (PEFT's adapter loaded here and "
        "ours in PEFT), the larger difference shown; serving runs the base model and an "
        "adapter in one batch with prompts past the 8-token sliding windows. "
        f"Ran in {time.perf_counter() - started:.0f} s.\n\n" + markdown_table(headers, rows)
    )
    write_section("architectures", body)
    print(body)


if __name__ == "__main__":
    main()
