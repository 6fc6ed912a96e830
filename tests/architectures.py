"""Tiny random models of every architecture rankwise supports, built in code (no download).

Each is small enough for unit tests and keeps what makes its family different: Qwen2's q/k/v
biases, Qwen3's q_norm/k_norm, Mistral's sliding window, Gemma2's logit soft-capping,
alternating sliding window and tied embeddings, Phi-3's fused ``qkv_proj``/``gate_up_proj``,
GPT-2's ``Conv1D`` layers in blocks ``h.N`` and GPT-NeoX's fused ``query_key_value``.
Sliding windows are 8 tokens, so a prompt of a dozen tokens already runs past them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from rankwise.train import TrainConfig, TrainResult, train

VOCAB = 128
WINDOW = 8  # sliding window of Mistral and Gemma2


def configs() -> dict[str, PretrainedConfig]:
    """One small config per architecture: hidden 32, 2 layers, 4 heads (2 KV heads where GQA)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return {
        "llama": LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": Qwen3Config(**common, num_key_value_heads=2, head_dim=8),
        "mistral": MistralConfig(**common, num_key_value_heads=2, sliding_window=WINDOW),
        "gemma2": Gemma2Config(
            **common,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=WINDOW,
            final_logit_softcapping=3.0,  # small, so that the capping visibly bends the logits
            attn_logit_softcapping=5.0,
            tie_word_embeddings=True,
        ),
        "phi3": Phi3Config(**common, num_key_value_heads=2),
        "gpt2": GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "gpt_neox": GPTNeoXConfig(**common, rotary_pct=0.5),
    }


ARCHITECTURES = tuple(configs())


def tiny_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of ``arch`` (fp32, eval mode, frozen)."""
    torch.manual_seed(seed)
    config = configs()[arch]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # large enough weights that adapters and capping change the logits
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.1)
    return model.eval().requires_grad_(False)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0".."w124" with <unk>, <s> and </s> (ids 0, 1, 2)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(125)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over 125 characters (no merges) with <unk>, <s> and </s> (ids 0-2).

    Saved folders use it: transformers rebuilds some families' tokenizers on load (Qwen2's as a
    byte-level BPE with its own pre-tokenizer), which keeps a byte-level vocabulary intact but
    would drop every word of ``word_tokenizer``.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    chars = sorted(c for c in alphabet if c.isalnum() and c.isascii()) + ["Ġ", ".", ","]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars[: VOCAB - 3]])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """``tiny_model(arch, seed)`` with ``byte_tokenizer()`` saved as a Hugging Face folder."""
    tiny_model(arch, seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def train_tiny(arch: str, folder: Path, steps: int) -> tuple[TrainResult, list[float]]:
    """LoRA r=4 on every linear layer of a saved ``tiny_model(arch)``, trained ``steps`` steps
    on 16 word pairs: the result and the logged loss per step."""
    data = folder / "data.jsonl"
    records = [{"prompt": f"w{i} w{i + 3}", "completion": "w7 w8"} for i in range(16)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = TrainConfig.from_mapping(
        dict(
            model=str(save_tiny_model(arch, folder / "model")),
            data=str(data),
            output_dir=str(folder / "run"),
            r=4,
            max_steps=steps,
            batch_size=8,
            lr=2e-2,
            warmup_steps=1,
            eval_every=0,
            save_every=0,
            log_every=1,
            seq_len=32,
        )
    )
    result = train(config)
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    return result, [json.loads(line)["loss"] for line in lines]
