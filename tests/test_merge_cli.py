"""``rankwise merge`` from flags and YAML, and the one-sentence errors of bad merges."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_merge import random_adapter

from rankwise.adapters import LoraWeights, read_adapter, write_adapter
from rankwise.commands import merge as merge_command
from rankwise.errors import RankwiseError
from rankwise.merge import merge_adapters


def rankwise_merge(argv: list[str]) -> None:
    """Run the merge verb as ``rankwise merge ARGV`` would (without cli.COMMANDS)."""
    parser = argparse.ArgumentParser(prog="rankwise")
    merge_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["merge", *argv])
    args.func(args)


@pytest.fixture
def folders(tmp_path):
    a = write_adapter(random_adapter(0, rank=4), tmp_path / "a")
    b = write_adapter(random_adapter(1, rank=2, kinds=("q_proj", "k_proj")), tmp_path / "b")
    return str(a), str(b)


def test_cli_writes_a_peft_adapter(tmp_path, folders, capsys):
    rankwise_merge([*folders, "--method", "ties", "--rank", "3", "-o", str(tmp_path / "out")])
    merged = read_adapter(tmp_path / "out")
    assert merged.base_model == "tiny" and {merged.rank(m) for m in merged.factors} == {3}
    assert "discarded energy" in capsys.readouterr().out


def test_yaml_config_equals_flags_and_flags_override(tmp_path, folders):
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"adapters: [{folders[0]}, {folders[1]}]\nmethod: lego\nrank: 5\nseed: 2\n"
        f"weights: [0.5, 1.5]\noutput: {tmp_path / 'yaml'}\n"
    )
    rankwise_merge(["--config", str(config)])
    flags = ["--method", "lego", "--rank", "5", "--seed", "2", "--weights", "0.5", "1.5"]
    rankwise_merge([*folders, *flags, "-o", str(tmp_path / "flags")])
    from_yaml, from_flags = read_adapter(tmp_path / "yaml"), read_adapter(tmp_path / "flags")
    for module in from_flags.factors:
        assert torch.equal(from_yaml.delta(module), from_flags.delta(module))
    rankwise_merge(["--config", str(config), "--rank", "2", "-o", str(tmp_path / "over")])
    assert {read_adapter(tmp_path / "over").rank(m) for m in from_flags.factors} == {2}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adapters: [a]\nmethod: ties\nsparsity: 0.2\n", "unknown config keys.*sparsity"),
        ("adapters: [a]\nrank: yes\n", "rank must be int"),
        ("adapters: [a]\nweights: [1, two]\n", "weights must be a list of"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_yaml_is_one_sentence(tmp_path, text, message):
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    with pytest.raises(RankwiseError, match=message):
        rankwise_merge(["--config", str(config), "-o", str(tmp_path / "out")])


def test_adapters_for_different_base_models_are_refused():
    a, b = random_adapter(0), random_adapter(1)
    b.base_model = "other-model"
    with pytest.raises(RankwiseError, match="different base models.*tiny.*other-model"):
        merge_adapters([a, b])
    module = "model.layers.0.self_attn.q_proj"
    wide = LoraWeights({module: (torch.zeros(2, 64), torch.zeros(64, 2))}, {module: 4.0})
    with pytest.raises(RankwiseError) as err:
        merge_adapters([a, wide], names=["adapter 'a'", "adapter 'wide'"])
    message = str(err.value)
    assert "adapter 'wide'" in message and module in message
    assert "[64, 64]" in message and "[32, 32]" in message and "different base models" in message


def test_rank_above_what_the_adapters_hold_is_refused():
    adapters = [random_adapter(0, rank=4), random_adapter(1, rank=2)]
    with pytest.raises(RankwiseError, match="rank 7 is above.*at most rank 6 .*sum of the adapt"):
        merge_adapters(adapters, method="lego", rank=7)
    # TIES's merged updates are dense: their rank is bounded by min(out, in) of the widest module
    with pytest.raises(RankwiseError, match="at most rank 32"):
        merge_adapters(adapters, method="ties", rank=33)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, "got 1 weights for 2 adapters: give one weight per adapter"),
        ({"method": "slerp"}, "unknown merge method 'slerp': choose one of"),
        ({"method": "ties", "density": 1.5}, r"density must be in \(0, 1\]"),
        ({"method": "linear", "density": 0.5}, "density applies to .*ties.*not to linear"),
        ({"rank": 0}, "rank must be a positive integer"),
    ],
)
def test_bad_arguments_are_one_sentence(kwargs, message):
    with pytest.raises(RankwiseError, match=message):
        merge_adapters([random_adapter(0), random_adapter(1)], **kwargs)


def test_missing_output_is_refused(folders):
    with pytest.raises(RankwiseError, match="output folder"):
        rankwise_merge([*folders])
