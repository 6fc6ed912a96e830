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
