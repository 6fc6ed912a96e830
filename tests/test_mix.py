"""Mixtures end to end on a tiny model: save/load round trip, training, resume, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, tiny_llama
from test_train import write_data

from rankwise.adapters import LoraConfig, inject_adapter, save_adapter
from rankwise.cli import main
from rankwise.commands import mix
from rankwise.errors import RankwiseError
from rankwise.evaluate.generation import generate_batch
from rankwise.mixture import MixConfig, build_mixture, load_mixture, save_mixture, train_mixture
from rankwise.mixture.inspect import inspect_mixture, plot_gates
from rankwise.mixture.mixture import CONFIG_FILE
from rankwise.models import load_model
from rankwise.train.metrics import read_metrics

ROUTER_SETTINGS = {
    "mola": {"expert_pattern": "2,3", "top_k": 2, "aux_coef": 0.001},
    "smora": {"rank": 8, "top_k": 2},
    "flylora": {"rank": 8, "top_k": 2},
    "radargate": {"num_experts": 3},
    "softmax": {"num_experts": 3},
    "xlora": {"top_k": 2, "layerwise": True, "classifier_depth": 2},
}


def adapters(folder: Path, n: int = 3) -> list[str]:
    """n random PEFT adapters for the tiny model (B non-zero)."""
    paths = []
    for seed in range(n):
        donor = tiny_llama()
        torch.manual_seed(seed)
        for layer in inject_adapter(
            donor, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        ).values():
            torch.nn.init.normal_(layer.lora_B, std=0.2)
        paths.append(str(save_adapter(donor, folder / f"adapter{seed}")))
    return paths


def settings(router: str, folder: Path) -> dict:
    extra = {"adapters": adapters(folder)} if router == "xlora" else {}
    return {"router": router, **ROUTER_SETTINGS[router], **extra}


def build(model: torch.nn.Module, router: str, **options):
    """A fresh mixture of ``router`` with these settings on the model."""
    return build_mixture(model, router, options)


def targeted(router: str, folder: Path, targets: list[str]) -> dict:
    """``settings`` plus the target modules, where the router takes them (not X-LoRA)."""
    values = settings(router, folder)
    return values if router == "xlora" else {**values, "target_modules": targets}


@pytest.mark.parametrize("router", sorted(ROUTER_SETTINGS))
def test_save_load_round_trip_gives_identical_logits(router, tmp_path, tokens):
    model = tiny_llama()
    values = targeted(router, tmp_path, ["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(1)
    built = build(model, **values)
    with torch.no_grad():
        for layer in built.layers.values():
            layer.lora_B.normal_(std=0.2)
            saved = layer.policy.state_dict()
            for name, buffer in layer.policy.named_buffers():
                if name in saved:
                    buffer.normal_()  # SMoRA / FlyLoRA balancing biases are saved too
    expected = model(tokens).logits
    save_mixture(built, tmp_path / "mix", base_model="tiny")
    fresh = tiny_llama()
    torch.manual_seed(2)  # a different draw of every fresh parameter
    load_mixture(fresh, tmp_path / "mix")
    torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=0)
    saved = json.loads((tmp_path / "mix" / CONFIG_FILE).read_text())
    assert saved["router_config"]["router"] == router and saved["base_model"] == "tiny"
    assert not list((tmp_path / "mix").glob("*.bin"))


def test_load_rejects_a_mismatched_model(tmp_path):
    built = build(tiny_llama(), "mola", target_modules=["q_proj"])
    save_mixture(built, tmp_path / "mix")
    with pytest.raises(RankwiseError, match="no linear layer|does not match|wrong shapes"):
        load_mixture(tiny_llama(hidden=64), tmp_path / "mix")


def mix_config(tmp_path: Path, router: str, **overrides) -> MixConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_model(tmp_path / "tiny", init_range=0.2)
    values = dict(
        model=str(model_dir),
        data=str(write_data(tmp_path, n=16)),
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        batch_size=16,  # the whole data set: every step sees the same batch
        lr=2e-2,
        warmup_steps=1,
        save_every=4,
        log_every=1,
        eval_every=0,
        **targeted(router, tmp_path, ["q_proj", "v_proj", "up_proj"]),
    )
    return MixConfig.from_mapping({**values, **overrides})


@pytest.mark.parametrize("router", sorted(ROUTER_SETTINGS))
def test_a_few_steps_lower_the_loss(router, tmp_path):
    config = mix_config(tmp_path, router)
    result = train_mixture(config)
    losses = [m["loss"] for m in read_metrics(config.output / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < losses[0]
    assert (config.output / CONFIG_FILE).is_file() and result.steps == 8


def test_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
    config = mix_config(tmp_path, "smora", batch_size=4, keep_last=2)
    full = train_mixture(config)
    final = (config.output / "mixture.safetensors").read_bytes()
    last = config.output / "checkpoints" / "step-000008"
    assert (last / "mixture.safetensors").read_bytes() == final
    for path in sorted(last.iterdir()):  # as if killed after the checkpoint at step 4
        path.unlink()
    last.rmdir()
    resumed = train_mixture(config, resume=True)
    assert resumed.final_loss == full.final_loss
    assert (config.output / "mixture.safetensors").read_bytes() == final


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    mix.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["mix", *argv])


def test_cli_train_and_inspect_radargate(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny", init_range=0.2)
    data = tmp_path / "tasks.jsonl"
    with data.open("w") as file:
        for i in range(16):
            task = "even" if i % 2 == 0 else "odd"
            words = " ".join(f"w{3 + (i * 7 + j) % 40}" for j in range(3))
            file.write(json.dumps({"prompt": words, "completion": "w1 w2", "task": task}) + "\n")
    config = tmp_path / "mix.yaml"
    config.write_text(f"router: radargate\nnum_experts: 3\nmodel: {model_dir}\ndata: {data}\n")
    out = tmp_path / "run"
    args = parse(
        [
            "train",
            str(config),
            "--output-dir",
            str(out),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--target-modules",
            "q_proj,v_proj",
            "--eval-every",
            "0",
            "--warmup-steps",
            "1",
        ]
    )
    args.func(args)
    inspect = ["inspect", str(out), "--model", str(model_dir), "--data", str(data)]
    args = parse([*inspect, "--examples", "4", "--dtype", "bfloat16"])  # fp32 experts, bf16 x
    args.func(args)
    printed = capsys.readouterr().out
    assert "even: leans on expert" in printed and "contrastive pattern" in printed
    assert (out / "inspect" / "gates-even.png").is_file()
    assert (out / "inspect" / "rotation-angles.png").is_file()
    report = json.loads((out / "inspect" / "inspect.json").read_text())
    assert set(report["angles_before"]) == {"even", "odd"} == set(report["contrast_per_task"])
    grids = report["angles_before"]["even"]
    assert len(grids) == 4 and all(len(g) == 3 for g in grids.values())  # q, v of 2 blocks
    # generate and eval take the mixture too
    tiny = ["--model", str(model_dir), "--mixture", str(out), "--max-new-tokens", "3"]
    assert main(["generate", *tiny, "w3 w4"]) == 0
    assert main(["eval", *tiny, "--data", str(data), "--json", str(tmp_path / "eval.json")]) == 0
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["mixture"] == str(out) and set(scores["exact_match"]) == {"even", "odd"}


def test_mix_config_errors(tmp_path):
    with pytest.raises(RankwiseError, match="lora_dropout"):
        MixConfig.from_mapping({"router": "mola", "lora_dropout": 0.1})
    with pytest.raises(RankwiseError, match="adapters"):
        MixConfig.from_mapping({"router": "xlora"})
    args = parse(["train", "--router", "xlora", "--adapters", "a,b"])
    assert MixConfig.from_args(args).adapters == ["a", "b"]


@pytest.mark.parametrize("router", sorted(ROUTER_SETTINGS))
def test_generate_matches_greedy_full_forwards(router, tmp_path):
    model = tiny_llama()
    built = build(model, **targeted(router, tmp_path, ["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in built.layers.values():
            layer.lora_B.normal_(std=0.3)
    prompt = torch.tensor([[5, 9, 17, 33]])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
    )
    ids = prompt
    for _ in range(4):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=-1)
    assert torch.equal(out, ids)


def test_inspect_mola_with_uneven_experts(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    loaded = load_model(str(model_dir))
    built = build(loaded.model, "mola", expert_pattern="2,4", target_modules=["q_proj"])
    records = [
        {"prompt": f"w{i} w{i + 1}", "completion": "w3", "task": "ab"[i % 2]} for i in range(6)
    ]
    report = inspect_mixture(loaded.model, loaded.tokenizer, built, records, batch_size=2)
    assert set(report.gates) == {"a", "b"}
    assert [len(g) for g in report.gates["a"].values()] == [2, 4]
    for gates in report.gates["a"].values():
        assert abs(sum(gates) - 1) < 1e-5  # top-k gates sum to 1 on every token
    assert len(plot_gates(report, tmp_path / "png")) == 2
    assert report.angles_before is None


@pytest.mark.parametrize("router", ["xlora", "mola"])
def test_left_padded_batch_generates_like_single_prompts(router, tmp_path):
    loaded = load_model(str(save_tiny_model(tmp_path / "tiny")))
    built = build(loaded.model, **targeted(router, tmp_path, ["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in built.layers.values():
            layer.lora_B.normal_(std=0.3)
    prompts = ["w5 w9 w17 w33 w8", "w4"]
    batch = generate_batch(loaded.model, loaded.tokenizer, prompts, max_new_tokens=3)
    alone = [
        generate_batch(loaded.model, loaded.tokenizer, [p], max_new_tokens=3)[0] for p in prompts
    ]
    assert batch == alone


@pytest.mark.parametrize(("router", "rank_key"), [("mola", "expert_rank"), ("smora", "rank")])
def test_a_version_1_mixture_still_loads(router, rank_key, tmp_path, tokens):
    """Format 1 had one shared RouterConfig whose `r` meant either rank: it maps to the one the
    router read, and keys the router never read are dropped."""
    model = tiny_llama()
    settings = {"target_modules": ["q_proj"], rank_key: 4, "top_k": 2}
    built = build(model, router, **settings)
    with torch.no_grad():
        for layer in built.layers.values():
            layer.lora_B.normal_(std=0.2)
    expected = model(tokens).logits
    save_mixture(built, tmp_path / "mix")
    file = tmp_path / "mix" / CONFIG_FILE
    saved = json.loads(file.read_text())
    old = {k: v for k, v in saved["router_config"].items() if k != rank_key}
    saved["router_config"] = {
        **old,
        "r": 4,
        "num_experts": 4,
        "bias_rate": 1e-3,
        "layerwise": False,
    }
    saved["version"] = 1
    file.write_text(json.dumps(saved))
    fresh = tiny_llama()
    load_mixture(fresh, tmp_path / "mix")
    torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=0)
