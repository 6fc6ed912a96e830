"""``rankwise merge`` with calibration prompts (RegMean), method settings as flags, --report."""

from __future__ import annotations

import json

import pytest
import torch
from test_merge import random_adapter
from test_merge_cli import rankwise_merge

from rankwise.adapters import read_adapter, write_adapter
from rankwise.errors import RankwiseError
from rankwise.merge import METHODS, merge_adapters
from rankwise.merge.calibration import task_grams
from rankwise.models import load_model


def prompts(path, words: list[str], answer: str):
    records = [{"prompt": f"{w} w9 w{i}", "completion": answer} for i, w in enumerate(words)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def folders(tmp_path):
    a = write_adapter(random_adapter(0, rank=4), tmp_path / "a")
    b = write_adapter(random_adapter(1, rank=2, kinds=("q_proj", "k_proj")), tmp_path / "b")
    return str(a), str(b)


def test_regmean_from_the_cli_reads_only_the_prompts(tmp_path, folders, model_dir):
    c1 = prompts(tmp_path / "c1.jsonl", ["w1", "w2", "w3"], "w4 w5")
    c2 = prompts(tmp_path / "c2.jsonl", ["w6", "w7"], "w8")
    model = ["--model", str(model_dir), "--device", "cpu", "--method", "regmean", "--rank", "6"]
    rankwise_merge(
        [*folders, *model, "--calib", c1, c2, "--alpha", "0.5", "-o", str(tmp_path / "m")]
    )
    other = prompts(tmp_path / "c1b.jsonl", ["w1", "w2", "w3"], "w20 w21 w22")  # new answers
    rankwise_merge(
        [*folders, *model, "--calib", other, c2, "--alpha", "0.5", "-o", str(tmp_path / "n")]
    )
    cli, same = read_adapter(tmp_path / "m"), read_adapter(tmp_path / "n")
    adapters = [read_adapter(f) for f in folders]
    grams = task_grams(load_model(str(model_dir), device="cpu"), adapters, [c1, c2])
    python = merge_adapters(
        adapters, method="regmean", rank=6, grams=grams, settings={"alpha": 0.5}
    ).weights
    for module in cli.factors:
        assert torch.allclose(cli.delta(module), python.delta(module), atol=1e-5), module
        assert torch.allclose(cli.delta(module), same.delta(module), atol=1e-6), module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "regmean"], "regmean needs calibration data: give one --calib source"),
        (["--method", "regmean", "--calib", "x.jsonl"], "got 1 calibration sources for 2"),
        (["--method", "tsv", "--calib", "x.jsonl", "y.jsonl"], "--calib applies to regmean"),
        (["--method", "iso_cts", "--alpha", "0.5"], "'alpha' is a setting of method regmean"),
    ],
)
def test_bad_calibration_and_settings_are_one_sentence(tmp_path, folders, argv, message):
    with pytest.raises(RankwiseError, match=message):
        rankwise_merge([*folders, *argv, "-o", str(tmp_path / "out")])


def test_method_settings_as_flags_and_yaml_keys(tmp_path, folders):
    rankwise_merge([*folders, "--method", "iso_cts", "--common-fraction", "0.5",
                    "--rank", "6", "-o", str(tmp_path / "flags")])  # fmt: skip
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"adapters: [{folders[0]}, {folders[1]}]\nmethod: iso_cts\ncommon_fraction: 0.5\n"
        f"rank: 6\noutput: {tmp_path / 'yaml'}\n"
    )
    rankwise_merge(["--config", str(config)])
    adapters = [read_adapter(f) for f in folders]
    python = merge_adapters(
        adapters, method="iso_cts", rank=6, settings={"common_fraction": 0.5}
    ).weights
    for folder in ("flags", "yaml"):
        merged = read_adapter(tmp_path / folder)
        for module in python.factors:
            assert torch.allclose(merged.delta(module), python.delta(module), atol=1e-6)


def test_report_prints_pairwise_interference(tmp_path, folders, capsys):
    rankwise_merge([*folders, "--report"])
    out = capsys.readouterr().out
    assert "in overlap" in out and f"{folders[0]} / {folders[1]}" in out
    assert "largest input overlap" in out and not (tmp_path / "out").exists()


def test_interference_is_one_for_the_same_adapter_and_zero_for_orthogonal_ones():
    from rankwise.merge.interference import interference

    a = random_adapter(3, kinds=("q_proj",))
    b = random_adapter(4, kinds=("q_proj",))
    for module, (a_a, b_a) in a.factors.items():  # b: inputs and outputs orthogonal to a's
        q_in, q_out = torch.linalg.qr(a_a.T)[0], torch.linalg.qr(b_a)[0]
        a_b, b_b = b.factors[module]
        b.factors[module] = (a_b - (a_b @ q_in) @ q_in.T, b_b - q_out @ (q_out.T @ b_b))
    report = interference([a, a, b], ["a", "a2", "b"])
    same, apart = report.pairs()[("a", "a2")], report.pairs()[("a", "b")]
    assert same.cosine == pytest.approx(1) and same.input_overlap == pytest.approx(1)
    assert same.output_overlap == pytest.approx(1)
    assert apart.cosine < 1e-5 and apart.input_overlap < 1e-5 and apart.output_overlap < 1e-5


def test_regmean_plus_matches_regmean_on_the_first_block_and_refits_later_ones(
    tmp_path, folders, model_dir
):
    c1 = prompts(tmp_path / "c1.jsonl", ["w1", "w2", "w3"], "w4")
    c2 = prompts(tmp_path / "c2.jsonl", ["w6", "w7"], "w8")
    common = [*folders, "--model", str(model_dir), "--device", "cpu", "--method", "regmean"]
    common += ["--rank", "6", "--calib", c1, c2]
    rankwise_merge([*common, "-o", str(tmp_path / "plain")])
    rankwise_merge([*common, "--regmean-plus", "true", "-o", str(tmp_path / "plus")])
    plain, plus = read_adapter(tmp_path / "plain"), read_adapter(tmp_path / "plus")
    assert set(plain.factors) == set(plus.factors)
    for module in plain.factors:
        close = torch.allclose(plain.delta(module), plus.delta(module), atol=1e-6)
        assert close == (".layers.0." in module), module  # block 1 sees block 0 merged


def test_help_lists_every_method_and_each_methods_settings(capsys):
    with pytest.raises(SystemExit):
        rankwise_merge(["--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(METHODS) + "}" in out.replace("\n", "").replace(" ", "")
    for flag in (
        "--common-fraction",
        "--alpha",
        "--regmean-plus",
        "--calib",
        "--report",
        "--learn",
    ):
        assert flag in out
