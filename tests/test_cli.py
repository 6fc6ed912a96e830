"""The command line: verbs on a tiny model folder, one-line errors with exit status 2."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

from rankwise.adapters import LoraConfig, inject_adapter, save_adapter
from rankwise.cli import main


def test_info_lists_modules(model_dir, capsys):
    assert main(["info", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "down_proj" in out and "x2" in out


def test_generate_with_adapter(model_dir, tmp_path, capsys):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "ad")
    args = ["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "ad"), "w1 w2"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--model", "/no/such/model"], "not found"),
        (["generate", "--adapter", "/no/such/adapter", "hi"], "does not exist"),
        (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    ],
)
def test_errors_are_one_line_with_status_2(model_dir, args, message, capsys):
    if args[0] == "generate":
        args = [args[0], "--model", str(model_dir), *args[1:]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("rankwise: error:")


def test_debug_shows_the_traceback(model_dir):
    from rankwise.errors import RankwiseError

    with pytest.raises(RankwiseError):
        main(["--debug", "info", "--model", "/no/such/model"])


@pytest.mark.parametrize("name", ["task", "chat", "text"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    from rankwise.configfile import load_yaml
    from rankwise.train.config import TrainConfig

    root = Path(__file__).resolve().parent.parent
    config = TrainConfig.from_mapping(load_yaml(root / "examples" / f"{name}.yaml"))
    assert config.max_steps > 0


@pytest.mark.parametrize("router", ["softmax", "mola", "smora", "flylora", "radargate", "xlora"])
def test_example_mixture_configs_are_valid(router):
    from pathlib import Path

    from rankwise.configfile import load_yaml
    from rankwise.mixture import MixConfig

    root = Path(__file__).resolve().parent.parent
    config = MixConfig.from_mapping(load_yaml(root / "examples" / f"mix-{router}.yaml"))
    assert config.router == router and config.max_steps > 0


def test_help_lists_choices_defaults_and_bounds(capsys):
    for verb in (["mix", "train"], ["merge"], ["train"], ["eval"], ["compress"]):
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        out = capsys.readouterr().out
        assert "default:" in out, verb
    with pytest.raises(SystemExit):
        main(["mix", "train", "--help"])
    out = capsys.readouterr().out
    assert "{softmax,mola,smora,flylora,radargate,xlora}" in out and "within [1, inf)" in out
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "{linear,ties,dare_linear,dare_ties,lego" in capsys.readouterr().out


def test_train_then_eval_from_the_command_line(model_dir, tmp_path, capsys):
    import json

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"w{i} w5", "completion": "w7"}) + "\n" for i in range(3, 20))
    )
    out = tmp_path / "out"
    common = ["--model", str(model_dir)]
    assert (
        main(
            [
                "train",
                *common,
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--r",
                "2",
                "--target-modules",
                "q_proj,v_proj",
            ]
        )
        == 0
    )
    assert (out / "adapter_config.json").exists()
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                *common,
                "--adapter",
                str(out),
                "--data",
                str(data),
                "--json",
                str(report),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert "exact match: all" in capsys.readouterr().out
    assert json.loads(report.read_text())["exact_match"]["all"]["total"] == 17


def test_malformed_data_line_is_named(model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "w1", "completion": "w2"}\n{"prompt": "w1"\n')
    args = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "o"),
        "--max-steps",
        "1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
    assert main([*args, "--skip-bad-lines", "true"]) == 0
    assert "1 malformed lines skipped" in capsys.readouterr().out
