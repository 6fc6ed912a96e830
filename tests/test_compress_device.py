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
import sys
from pathlib import Path

import pytest
import torch
from architectures import tiny_model, word_tokenizer
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors  # what `with torch.device(d)` redirects

import rankwise.compress
from rankwise.compress import METHODS, collect_statistics, compress, make_compressor
from rankwise.compress.precision import accumulation_dtype, factor_device

COMPRESS = Path(rankwise.compress.__file__).parent
TORCH = Path(torch.__file__).parent
FACTORIES = _device_constructors()


def caller() -> tuple[Path, int] | None:
    """(file, line) of the innermost frame outside torch and this recorder: who called torch."""
    frame = sys._getframe(1)
    while frame is not None and (
        Path(frame.f_code.co_filename).is_relative_to(TORCH) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return None if frame is None else (Path(frame.f_code.co_filename), frame.f_lineno)


class DeviceRecorder(TorchFunctionMode):
    """Records compress-code tensor factories without a device, and moves to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            self.note(f"torch.{func.__name__} without device=")
        elif func is torch.Tensor.cpu:
            self.note(".cpu()")
        return func(*args, **kwargs)

    def note(self, what: str) -> None:
        where = caller()
        if where is not None and where[0].is_relative_to(COMPRESS):
            self.events.append(f"{what} at {where[0].name}:{where[1]}")


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
    [("qwen2", m) for m in sorted(METHODS)] + [("gpt2", "svd-llm"), ("qwen3", "a3")],
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


@pytest.mark.parametrize("method", sorted(METHODS))
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
@pytest.mark.parametrize("method", sorted(METHODS))
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
