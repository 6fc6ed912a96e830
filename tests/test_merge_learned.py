"""Learned merge coefficients: only one weight per adapter and module trains, the objective falls,
and the result is a plain adapter (the adapters' updates, re-weighted per module)."""

from __future__ import annotations

import pytest
import torch
from test_merge import random_adapter
from test_merge_calib import prompts
from test_merge_cli import rankwise_merge

from rankwise.adapters import attach_adapters, read_adapter, remove_experts, write_adapter
from rankwise.errors import RankwiseError
from rankwise.merge.learned import examples, objective
from rankwise.models import load_model


def mean_objective(loaded, adapters, sources, kind) -> float:
    attach_adapters(loaded.model, adapters)
    try:
        with torch.no_grad():
            values = [objective(loaded.model, *e, kind, "cpu")
                      for s in sources for e in examples(loaded.tokenizer, s, 16)]  # fmt: skip
    finally:
        remove_experts(loaded.model)
    return float(sum(values) / len(values))


@pytest.mark.parametrize("kind", ["loss", "entropy"])
def test_learned_coefficients_lower_the_objective_and_only_reweight(tmp_path, model_dir, kind):
    a = write_adapter(random_adapter(0, rank=4), tmp_path / "a")
    b = write_adapter(random_adapter(1, rank=2, kinds=("q_proj", "k_proj")), tmp_path / "b")
    c1 = prompts(tmp_path / "c1.jsonl", ["w1", "w2", "w3", "w4"], "w5 w6")
    c2 = prompts(tmp_path / "c2.jsonl", ["w7", "w8", "w9"], "w10")
    rankwise_merge([str(a), str(b), "--model", str(model_dir), "--device", "cpu", "--learn", kind,
                    "--learn-steps", "25", "--learn-lr", "0.1", "--calib", c1, c2,
                    "--rank", "6", "-o", str(tmp_path / "m")])  # fmt: skip
    merged = read_adapter(tmp_path / "m")
    inputs = [read_adapter(a), read_adapter(b)]
    for module in merged.factors:
        deltas = [w.delta(module).flatten() for w in inputs if module in w.factors]
        basis = torch.stack(deltas, dim=1).double()  # (out * in, tasks)
        target = merged.delta(module).flatten().double()
        fit = basis @ torch.linalg.lstsq(basis, target[:, None]).solution
        assert torch.allclose(fit.squeeze(1), target, atol=1e-5), module  # Σ_t λ_mt ΔW_t
    loaded = load_model(str(model_dir), device="cpu")
    before = mean_objective(loaded, inputs, [c1, c2], kind)  # the plain sum
    after = mean_objective(loaded, [merged], [c1, c2], kind)
    assert after < before


def test_learn_needs_linear_and_one_source_per_adapter(tmp_path):
    a = write_adapter(random_adapter(0), tmp_path / "a")
    b = write_adapter(random_adapter(1), tmp_path / "b")
    with pytest.raises(RankwiseError, match="--learn needs one --calib source per adapter"):
        rankwise_merge([str(a), str(b), "--learn", "loss", "-o", str(tmp_path / "o")])
    with pytest.raises(RankwiseError, match="--learn trains the weights of a linear merge"):
        rankwise_merge([str(a), str(b), "--learn", "loss", "--method", "tsv",
                        "--calib", "x", "y", "-o", str(tmp_path / "o")])  # fmt: skip
