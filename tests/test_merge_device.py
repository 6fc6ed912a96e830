"""Merge code makes no tensor on torch's default device: every factory names its device."""

from __future__ import annotations

from pathlib import Path

import pytest
from device_discipline import FactoryRecorder
from test_merge import identity_grams, random_adapter
from test_merge_calib import prompts

import rankwise.merge
from rankwise.merge import METHODS, merge_adapters
from rankwise.merge.calibration import merge_layer_by_layer, task_grams
from rankwise.merge.interference import interference
from rankwise.merge.learned import learn_coefficients
from rankwise.models import load_model

MERGE = Path(rankwise.merge.__file__).parent


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_names_its_devices(method):
    adapters = [random_adapter(0), random_adapter(1, rank=2)]
    extra = {"grams": identity_grams(adapters[0]) * 2} if METHODS[method].needs_calibration else {}
    with FactoryRecorder(MERGE) as recorder:
        merge_adapters(adapters, method=method, rank=3, **extra)
        interference(adapters, ["a", "b"])
    assert recorder.events == []


def test_calibration_and_learning_name_their_devices(tmp_path, model_dir):
    adapters = [random_adapter(0), random_adapter(1, rank=2)]
    sources = [prompts(tmp_path / f"c{i}.jsonl", ["w1", "w2"], "w3") for i in range(2)]
    loaded = load_model(str(model_dir), device="cpu")

    def merge(parts, grams):
        return merge_adapters(parts, method="regmean", grams=grams)

    with FactoryRecorder(MERGE) as recorder:
        task_grams(loaded, adapters, sources)
        merge_layer_by_layer(loaded, adapters, sources, merge)
        learn_coefficients(loaded, adapters, sources, steps=2)
    assert recorder.events == []  # token ids are made on the CPU on purpose (device="cpu")
