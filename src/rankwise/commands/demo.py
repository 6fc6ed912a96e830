"""``rankwise demo``: the README's first command: load, adapt, save, reload, merge, generate."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rankwise.adapters import (
    LoraConfig,
    describe_trainable,
    expert_layers,
    inject_adapter,
    load_adapter,
    merge_experts,
    remove_experts,
    save_adapter,
)
from rankwise.commands.options import add_model_options
from rankwise.evaluate.generation import Sampling, generate
from rankwise.models import load_model

PROMPT = "Write one sentence about the sea."


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="a short tour on the embedded model")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    loaded = load_model(args.model, args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"loaded {loaded.name} in {time.perf_counter() - start:.1f}s")
    sampling = Sampling(max_new_tokens=40)
    print(f"\nbase model> {generate(model, tokenizer, PROMPT, sampling)}")

    inject_adapter(model, LoraConfig(r=16, lora_alpha=32))
    print(f"\nattached LoRA r=16 on all linear layers: {describe_trainable(model)}")
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: a small random update of B
        for layer in expert_layers(model).values():
            layer.lora_B.normal_(std=2e-3)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder, base_model=loaded.name)
        remove_experts(model)
        load_adapter(model, folder)
        print(f"saved and reloaded the adapter in PEFT's format ({folder})")
    print(f"\nadapted> {generate(model, tokenizer, PROMPT, sampling)}")
    merge_experts(model)
    print(f"\nmerged>  {generate(model, tokenizer, PROMPT, sampling)}")
