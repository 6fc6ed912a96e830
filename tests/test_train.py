"""The training loop on a tiny model: learning, exact resume after a kill, NaN stop, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import save_tiny_model
from device_discipline import on_meta_by_default
from safetensors.torch import load_file, save_file

from rankwise.adapters import read_adapter
from rankwise.errors import RankwiseError
from rankwise.train import RunConfig, TrainConfig, train
from rankwise.train import loop as loop_module
from rankwise.train.checkpoint import list_checkpoints
from rankwise.train.schedule import learning_rate


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny model with larger initial weights, so a few LoRA steps visibly lower the loss."""
    return save_tiny_model(tmp_path / "tiny", init_range=0.2)


def write_data(folder: Path, n: int = 64) -> Path:
    """Prompt/completion lines over the tiny tokenizer's words; the answer is the last word
    followed by a fixed phrase (learnable by a tiny random model in a few steps)."""
    gen = torch.Generator().manual_seed(0)
    path = folder / "data.jsonl"
    with path.open("w") as file:
        for _ in range(n):
            words = [f"w{int(i)}" for i in torch.randint(3, 60, (4,), generator=gen)]
            record = {"prompt": " ".join(words), "completion": f"{words[-1]} w1 w2 w9"}
            file.write(json.dumps(record) + "\n")
    return path


def config(model_dir: Path, tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir),
        data=str(write_data(tmp_path)),
        output_dir=str(tmp_path / "run"),
        r=4,
        lora_alpha=8,
        max_steps=8,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        save_every=2,
        keep_last=2,
        log_every=1,
        eval_every=0,
        seq_len=32,
    )
    return TrainConfig.from_mapping({**values, **overrides})


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, tolerance: float = 1e-6) -> None:
    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        assert (first[key] - second[key]).abs().max() < tolerance, key


def test_training_learns_and_writes_everything(model_dir, tmp_path):
    result = train(config(model_dir, tmp_path, max_steps=30))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert losses[-1] < 0.7 * losses[0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    weights = read_adapter(tmp_path / "run")
    assert len(weights.factors) == 14 and result.steps == 30
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000028", "step-000030"]


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"init": "pissa"},
        {"init": "corda_kpm", "calib_samples": 8, "seq_len": 16},
        {"init": "eva", "calib_samples": 8, "seq_len": 16},
        {"init": "kasa"},
        {"init": "loldu"},
        {"init": "nola", "nola_bases": 8},
        {"use_dora": True, "loraplus_lr_ratio": 4.0},
    ],
    ids=["lora", "pissa", "corda", "eva", "kasa", "loldu", "nola", "dora+loraplus"],
)
def test_interrupted_run_resumes_to_the_same_adapter(model_dir, tmp_path, monkeypatch, variant):
    train(
        config(model_dir, tmp_path, output_dir=str(tmp_path / "full"), lora_dropout=0.1, **variant)
    )
    broken = config(
        model_dir, tmp_path, output_dir=str(tmp_path / "cut"), lora_dropout=0.1, **variant
    )
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C during step 6: checkpoints 2 and 4 exist
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(broken)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert list_checkpoints(tmp_path / "cut")[-1].name == "step-000004"
    with pytest.raises(RankwiseError, match="--resume"):
        train(broken)
    train(broken, resume=True)
    assert_same_adapter(tmp_path / "full", tmp_path / "cut")


def test_kill_9_then_resume(model_dir, tmp_path):
    cfg = config(model_dir, tmp_path)
    command = [
        sys.executable,
        "-m",
        "rankwise.cli",
        "train",
        f"--model={cfg.model}",
        f"--data={cfg.data}",
        "--r=4",
        "--lora-alpha=8",
        "--batch-size=4",
        "--lr=1e-3",
        "--save-every=5",
        "--seq-len=32",
        "--eval-every=0",
        "--max-steps=200",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command, f"--output-dir={killed}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list_checkpoints(killed)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(killed)
    subprocess.run(
        [*command, f"--output-dir={killed}", "--resume"], env=env, check=True, capture_output=True
    )
    subprocess.run(
        [*command, f"--output-dir={tmp_path / 'whole'}"], env=env, check=True, capture_output=True
    )
    assert_same_adapter(killed, tmp_path / "whole")


def test_non_finite_loss_stops_and_keeps_the_checkpoint(model_dir, tmp_path, monkeypatch):
    real = loop_module.summed_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        return real(model, batch) * (float("nan") if calls["n"] >= 5 else 1.0)

    monkeypatch.setattr(loop_module, "summed_loss", poisoned)
    with pytest.raises(RankwiseError, match=r"loss became nan at step 5.*step-000004"):
        train(config(model_dir, tmp_path))
    assert list_checkpoints(tmp_path / "run")[-1].name == "step-000004"


def test_config_rejects_unknown_keys_and_bad_values(model_dir, tmp_path):
    with pytest.raises(RankwiseError, match="unknown config keys \\['rank'\\]"):
        TrainConfig.from_mapping({"rank": 4})
    with pytest.raises(RankwiseError, match="schedule"):
        TrainConfig.from_mapping({"schedule": "exponential"})


def test_schedule_warms_up_then_decays():
    lrs = [learning_rate(s, 1.0, 10, 100, "cosine") for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert learning_rate(50, 1.0, 10, 100, "linear") == pytest.approx(1 - 40 / 90)


def distributed_worker(
    rank: int, world: int, port: int, model_dir: str, tmp: str, accum: int = 1
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    cfg = config(
        Path(model_dir),
        Path(tmp),
        output_dir=str(Path(tmp) / "ddp"),
        batch_size=2 // accum,
        grad_accum=accum,
    )
    result = train(cfg)
    held = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}
    save_file(held, str(Path(tmp) / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("accum", [1, 2], ids=["one-micro-batch", "accumulating"])
def test_two_processes_match_one_with_the_same_global_batch(model_dir, tmp_path, accum):
    """DDP over 2 processes (gloo), with and without accumulation (no_sync), equals 1 process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(distributed_worker, args=(2, port, str(model_dir), str(tmp_path), accum), nprocs=2)
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    train(config(model_dir, tmp_path, output_dir=str(tmp_path / "single"), batch_size=4))
    # Same gradients up to float summation order; Adam's normalisation magnifies such last-bit
    # differences in near-zero gradients, hence a looser tolerance than for resume.
    assert_same_adapter(tmp_path / "ddp", tmp_path / "single", tolerance=1e-4)
    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ddp, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def first_losses(tmp_path: Path, name: str) -> list[float]:
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines]


def test_gradient_checkpointing_gives_the_same_losses(model_dir, tmp_path):
    train(config(model_dir, tmp_path, output_dir=str(tmp_path / "plain"), max_steps=3))
    train(
        config(
            model_dir,
            tmp_path,
            output_dir=str(tmp_path / "gc"),
            max_steps=3,
            gradient_checkpointing=True,
        )
    )
    assert first_losses(tmp_path, "gc") == pytest.approx(first_losses(tmp_path, "plain"), rel=1e-5)


def test_bf16_base_keeps_fp32_adapters(model_dir, tmp_path):
    result = train(config(model_dir, tmp_path, dtype="bfloat16", max_steps=3))
    dtypes = {p.dtype for p in result.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert next(result.model.get_decoder().parameters()).dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in adapter_tensors(tmp_path / "run").values())


@pytest.mark.parametrize("router", [None, "mola", "smora", "radargate"])
def test_a_training_step_places_every_tensor_explicitly(model_dir, tmp_path, monkeypatch, router):
    """What a GPU run needs, checked on the CPU: every tensor of a step (forward, loss, backward,
    auxiliary losses, routers' bookkeeping, validation) is made on the model's device or on the
    host on purpose, never on torch's default device."""
    from rankwise.mixture import MixConfig, Mixture, train_mixture

    for name in ("accumulate_gradients", "validation_loss"):
        monkeypatch.setattr(loop_module, name, on_meta_by_default(getattr(loop_module, name)))
    monkeypatch.setattr(Mixture, "after_step", on_meta_by_default(Mixture.after_step))
    values = dict(max_steps=2, eval_every=1, eval_data=str(write_data(tmp_path, n=8)))
    if router is None:
        train(config(model_dir, tmp_path, **values))
        return
    run = config(model_dir, tmp_path, **values).as_dict()
    cfg = {key: run[key] for key in RunConfig.__dataclass_fields__}  # not the adapter's settings
    extra = {
        "mola": {"aux_coef": 0.01},
        "smora": {"rank": 4, "top_k": 2},
        "radargate": {"num_experts": 3, "angle_rank": 2},
    }[router]
    train_mixture(MixConfig.from_mapping({**cfg, "router": router, **extra}))


def test_init_adapter_starts_the_run_from_its_factors_ranks_and_alphas(model_dir, tmp_path):
    from rankwise.adapters import LoraConfig, inject_adapter, save_adapter
    from rankwise.models import load_model

    start = load_model(str(model_dir)).model
    targets = LoraConfig(r=3, lora_alpha=5.0, target_modules=["q_proj", "v_proj"])
    for layer in inject_adapter(start, targets).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    save_adapter(start, tmp_path / "start")
    run = config(model_dir, tmp_path, init_adapter=str(tmp_path / "start"), lr=1e-12, max_steps=1)
    train(run)
    before, after = read_adapter(tmp_path / "start"), read_adapter(tmp_path / "run")
    assert after.factors.keys() == before.factors.keys()
    assert after.alphas == before.alphas == dict.fromkeys(before.factors, 5.0)
    for module, (a, b) in before.factors.items():
        assert a.shape[0] == 3
        torch.testing.assert_close(after.factors[module][0], a, rtol=0, atol=1e-6)
        torch.testing.assert_close(after.factors[module][1], b, rtol=0, atol=1e-6)


def test_init_adapter_refuses_a_policy_and_an_adapter_of_another_model(model_dir, tmp_path):
    with pytest.raises(RankwiseError, match="init_adapter gives the factors their start"):
        config(model_dir, tmp_path, init_adapter=str(tmp_path), use_dora=True)
    from rankwise.fed.config import FedConfig

    with pytest.raises(RankwiseError, match="init_adapter is not supported"):
        FedConfig(init_adapter=str(tmp_path))  # every client starts from the global state
    from rankwise.adapters import LoraConfig, inject_adapter, save_adapter, write_adapter
    from rankwise.models import load_model

    model = load_model(str(model_dir)).model
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "mine")
    other = read_adapter(tmp_path / "mine")
    other.factors = {m: (a[:, :-2], b) for m, (a, b) in other.factors.items()}  # narrower input
    write_adapter(other, tmp_path / "other")
    with pytest.raises(RankwiseError, match="does not fit this model at"):
        train(config(model_dir, tmp_path, init_adapter=str(tmp_path / "other")))
