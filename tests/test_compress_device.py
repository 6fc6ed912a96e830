"""Device and dtype discipline of compression, proven as far as a CPU-only machine allows.

What the recorder below proves: while ``compress`` checks, calibrates, factors and rebuilds a
model, no code under ``src/rankwise/compress/`` creates a tensor without naming its device (the
factories ``with torch.device(...)`` would redirect, ``nn.Linear(...)`` included) or calls
``.cpu()``. So on CUDA or MPS nothing compress makes lands on the CPU by default, and nothing is
sent there behind the model's back. What a CPU cannot tell apart: an explicit ``.to(device)``
to the model's device from one to the CPU (both are the CPU here; the only such calls move
token ids and indices to the model's device, and ``precision.for_factoring`` moves statistics
to the CPU for MPS only), and a literal ``device="cpu"`` (used only for the token ids in
``calibration_data``, host data by design). Nor does it run the float64 kernels on an
accelerator: the last test does where one exists, and the rules for MPS and CUDA are tested
as pure functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from architectures import tiny_model, word_tokenizer
from device_discipline import FactoryRecorder

import rankwise.compress
from rankwise.compress import METHODS, collect_statistics, compress, make_compressor
from rankwise.compress.precision import accumulation_dtype, factor_device

COMPRESS = Path(rankwise.compress.__file__).parent

# methods that take any --ratio (2:4 pruning removes exactly half, keeping dense shapes)
ANY_RATIO = sorted(m for m, cls in METHODS.items() if cls.fixed_ratio is None)


def DeviceRecorder() -> FactoryRecorder:  # noqa: N802 (read as the recorder of compress code)
    return FactoryRecorder(COMPRESS)


@pytest.fixture
def calib_file(tmp_path) -> str:
    path = tmp_path / "calib.jsonl"
    lines = [{"text": " ".join(f"w{(i * 7 + j) % 125}" for j in range(12))} for i in range(16)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_the_recorder_sees_a_default_device_factory_in_compress_code():
    code = compile(
        "torch.eye(2); torch.ones(2, device='cpu').cpu()", str(COMPRESS / "x.py"), "exec"
    )
    with DeviceRecorder() as recorder:
        exec(code, {"torch": torch})
    assert recorder.events == ["torch.eye without device= at x.py:1", ".cpu() at x.py:1"]


@pytest.mark.parametrize(
    ("arch", "method"),
    [("qwen2", m) for m in ANY_RATIO] + [("gpt2", "svd-llm"), ("qwen3", "a3")],
)
def test_compress_creates_nothing_on_the_default_device(arch, method, calib_file):
    model = tiny_model(arch)
    with DeviceRecorder() as recorder:
        compress(model, word_tokenizer(), method, 0.3, data=calib_file, samples=4, seq_len=16)
    assert recorder.events == []


def test_statistics_stay_on_the_device_in_float64_for_a_bfloat16_model():
    model = tiny_model("llama").to(torch.bfloat16)
    calib = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    needs = make_compressor("a3").needs(model) | make_compressor("asvd").needs(model)
    stats = collect_statistics(model, calib, needs)
    tensors = [*stats.gram.values(), *stats.abs_mean.values(), *stats.sq_mean.values()]
    assert tensors and {(t.device, t.dtype) for t in tensors} == {
        (torch.device("cpu"), torch.float64)
    }


@pytest.mark.parametrize("method", ANY_RATIO)
def test_compressed_weights_keep_the_model_dtype(method, calib_file):
    model = tiny_model("qwen2").to(torch.bfloat16)
    compress(model, word_tokenizer(), method, 0.3, data=calib_file, samples=4, seq_len=16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_precision_rules_per_device_type():
    """float64 where the device has it, else float32 accumulation and CPU factorisation (MPS)."""
    assert accumulation_dtype(torch.device("cuda", 1)) == torch.float64
    assert factor_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert accumulation_dtype(torch.device("mps")) == torch.float32
    assert factor_device(torch.device("mps")) == torch.device("cpu")
    assert accumulation_dtype(torch.device("cpu")) == torch.float64


ACCELERATOR = torch.accelerator.current_accelerator()


@pytest.mark.skipif(ACCELERATOR is None, reason="no accelerator; the recorder test stands in")
@pytest.mark.parametrize("method", ANY_RATIO)
def test_compression_stays_on_the_accelerator(method):
    model = tiny_model("qwen2").to(ACCELERATOR)
    calib = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    compressor = make_compressor(method)
    stats = collect_statistics(model, calib, compressor.needs(model))
    kinds = (stats.gram, stats.abs_mean, stats.sq_mean, stats.mean)
    assert {t.device.type for kind in kinds for t in kind.values()} <= {ACCELERATOR.type}
    rankwise.compress.compress_model(model, compressor, 0.3, stats)
    placed = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in placed} == {ACCELERATOR.type}
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]], device=ACCELERATOR)).logits
    assert torch.isfinite(logits).all()
