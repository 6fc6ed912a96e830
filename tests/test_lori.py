"""LoRI training: a frozen, seeded random A, only B trains, an ordinary PEFT adapter out; merging
says when a mix loses the benefit."""

from __future__ import annotations

import pytest
import torch
from test_merge_cli import rankwise_merge
from test_train import config

from rankwise.adapters import LoraConfig, inject_adapter, read_adapter
from rankwise.adapters.lori import read_lori_record
from rankwise.errors import RankwiseError
from rankwise.models import load_model
from rankwise.train import train


def lori_run(model_dir, tmp_path, name: str, seed: int | None, **kw):
    folder = tmp_path / name
    folder.mkdir()
    extra = {} if seed is None else {"lori_seed": seed}
    train(config(model_dir, folder, max_steps=6, save_every=0, **extra, **kw))
    return folder / "run"


def test_lori_trains_only_b_and_saves_an_ordinary_adapter(model_dir, tmp_path, capsys):
    first = lori_run(model_dir, tmp_path, "a", seed=1, lori_a_density=0.5)
    again = lori_run(model_dir, tmp_path, "b", seed=1, lori_a_density=0.5)
    other = lori_run(model_dir, tmp_path, "c", seed=2)
    plain = lori_run(model_dir, tmp_path, "d", seed=None)
    a, b, c = read_adapter(first), read_adapter(again), read_adapter(other)
    assert read_lori_record(first) == {"method": "lori", "seed": 1, "a_density": 0.5}
    assert read_lori_record(plain) is None
    same = LoraConfig(r=4, lora_alpha=8, lori_seed=1, lori_a_density=0.5)
    fresh = inject_adapter(load_model(str(model_dir), device="cpu").model, same)
    for module, (a_a, b_a) in a.factors.items():
        assert torch.equal(a_a, fresh[module].lora_A)  # A never trained: still the seed's draw
        assert not fresh[module].lora_A.requires_grad
        assert torch.equal(a_a, b.factors[module][0])  # the seed alone fixes A
        assert b_a.abs().sum() > 0  # B trained
        assert 0.3 < float((a_a != 0).float().mean()) < 0.7  # sparse A at density 0.5
        q_a, q_c = torch.linalg.qr(a_a.T)[0], torch.linalg.qr(c.factors[module][0].T)[0]
        assert float((q_a.T @ q_c).square().sum() / 4) < 0.6  # another seed, another projection
    rankwise_merge([str(first), str(plain), "-o", str(tmp_path / "mix")])
    assert "loses LoRI's low interference" in capsys.readouterr().err
    rankwise_merge([str(first), str(again), "-o", str(tmp_path / "same")])
    assert "share LoRI seed 1" in capsys.readouterr().err
    rankwise_merge([str(first), str(other), "-o", str(tmp_path / "ok")])
    assert "warning" not in capsys.readouterr().err


def test_lori_s_trains_only_the_dense_runs_largest_b_entries(model_dir, tmp_path):
    dense = lori_run(model_dir, tmp_path, "dense", seed=5)
    sparse = lori_run(model_dir, tmp_path, "sparse", seed=5, lori_b_mask=str(dense),
                      lori_b_density=0.2)  # fmt: skip
    d, s = read_adapter(dense), read_adapter(sparse)
    magnitudes = torch.cat([b.abs().flatten() for _, b in d.factors.values()])
    threshold = magnitudes.topk(int(0.2 * magnitudes.numel())).values[-1]
    trained = 0
    for module, (a, b) in s.factors.items():
        assert torch.equal(a, d.factors[module][0])  # the same frozen A
        outside = d.factors[module][1].abs() < threshold
        assert torch.all(b[outside] == 0)  # only the mask's entries moved
        trained += int((b != 0).sum())
    assert 0.1 * magnitudes.numel() < trained <= 0.2 * magnitudes.numel() + 1
    assert read_lori_record(sparse)["b_density"] == 0.2


def test_lori_refuses_inits_that_draw_a_themselves():
    with pytest.raises(RankwiseError, match="LoRI .*init_a"):
        LoraConfig(lori_seed=1, init="pissa")
    with pytest.raises(RankwiseError, match="LoRI-S .*needs the dense run's lori_seed"):
        LoraConfig(lori_b_mask="runs/dense")
