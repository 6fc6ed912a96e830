"""Compressed models on disk, through the CLI verb, and with LoRA adapters attached."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from rankwise.adapters import LoraConfig, inject_adapter
from rankwise.commands import compress as compress_command
from rankwise.compress import (
    A3Attention,
    collect_statistics,
    compress,
    compress_model,
    is_compressed,
    load_compressed,
    make_compressor,
    save_compressed,
)
from rankwise.compress.storage import RECORD
from rankwise.errors import RankwiseError


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's 128 ids ("t0" ... "t127")."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", eos_token="t1")


def compressed(method: str, ratio: float, **options):
    model = tiny_llama()
    compressor = make_compressor(method, **options)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    compress_model(
        model, compressor, ratio, collect_statistics(model, calib, compressor.needs(model))
    )
    return model


@pytest.mark.parametrize(("method", "options"), [("svd-llm", {}), ("asvd", {}), ("a3", {})])
def test_save_then_load_gives_the_same_logits(method, options, tmp_path, tokens):
    model = compressed(method, 0.3, **options)
    assert not save_compressed(model, tiny_tokenizer(), tmp_path / "out", {"method": method})
    assert is_compressed(tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)
    rebuilt = [m for m in loaded.modules() if isinstance(m, A3Attention)]
    assert all(m.config is loaded.config for m in rebuilt)  # sees attn_implementation changes
    assert json.loads((tmp_path / "out" / RECORD).read_text()) == {"method": method}


def test_plain_transformers_refuses_the_compressed_format(tmp_path):
    save_compressed(compressed("svd", 0.3), tiny_tokenizer(), tmp_path / "out", {})
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_uniform_mlp_narrowing_is_saved_as_a_plain_model(tmp_path, tokens):
    model = compressed("a3", 0.25, components=("mlp",))
    assert save_compressed(model, tiny_tokenizer(), tmp_path / "out", {})
    assert not is_compressed(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert plain.config.intermediate_size == 48
    torch.testing.assert_close(plain(tokens).logits, model(tokens).logits)


def test_saving_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(RankwiseError, match="not empty"):
        save_compressed(compressed("svd", 0.3), tiny_tokenizer(), tmp_path / "out", {})


def test_mismatched_weights_are_reported(tmp_path):
    save_compressed(compressed("svd", 0.3), tiny_tokenizer(), tmp_path / "out", {})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["modules"]["model.layers.0.mlp.up_proj"]["rank"] += 1
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RankwiseError, match="do not match"):
        load_compressed(tmp_path / "out")


@pytest.mark.parametrize("method", ["svd-llm", "a3"])
def test_compressed_models_accept_lora_adapters(method, tokens):
    model = compressed(method, 0.3)
    expected = model(tokens).logits
    replaced = inject_adapter(model, LoraConfig(r=2, target_modules="all-linear"))
    assert len(replaced) == (14 if method == "svd-llm" else 7) * 2
    torch.testing.assert_close(model(tokens).logits, expected)  # B starts at zero
    model(tokens).logits.sum().backward()
    assert all(layer.lora_A.grad is not None for layer in replaced.values())


def test_compress_verb_writes_model_settings_and_costs(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    parser = argparse.ArgumentParser()
    compress_command.add_parser(parser.add_subparsers())
    argv = ["compress", "--model", str(folder), "--method", "a3", "--ratio", "0.25",
            "--samples", "4", "--seq-len", "32", "-o", str(tmp_path / "out")]  # fmt: skip
    args = parser.parse_args(argv)
    args.func(args)
    record = json.loads((tmp_path / "out" / RECORD).read_text())
    assert record["settings"]["method"] == "a3" and record["settings"]["ratio"] == 0.25
    assert record["calibration"]["data"] == "corpus:python-docs"
    assert record["calibration"]["tokens"] == 4 * 32
    costs = record["costs"]
    assert costs["after"]["kv_bytes_per_token"] < costs["before"]["kv_bytes_per_token"]
    assert "KV-cache bytes/token" in capsys.readouterr().out
    assert is_compressed(tmp_path / "out")


def test_compress_without_calibration_records_none():
    model = tiny_llama()
    record = compress(model, tiny_tokenizer(), "svd", 0.2)
    assert record["calibration"] is None
    assert record["costs"]["after"]["linear_params"] < record["costs"]["before"]["linear_params"]


@pytest.mark.parametrize("method, options", [("svd", {}), ("a3", {})])
def test_load_model_and_training_use_a_compressed_folder(method, options, tmp_path, tokens):
    from rankwise.models import load_model
    from rankwise.train import TrainConfig, train

    model = compressed(method, 0.3, **options)
    save_compressed(model, tiny_tokenizer(), tmp_path / "out", {"method": method})
    loaded = load_model(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.allclose(loaded.model(tokens).logits, model(tokens).logits, atol=1e-5)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "w1 w2", "completion": "w3"}) + "\n")
    config = TrainConfig.from_mapping(
        dict(
            model=str(tmp_path / "out"),
            data=str(data),
            max_steps=2,
            output_dir=str(tmp_path / "run"),
            r=2,
            batch_size=1,
            eval_every=0,
            target_modules="all-linear",
        )
    )
    assert train(config).steps == 2
