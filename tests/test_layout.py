"""The layering docs/ARCHITECTURE.md describes: imports only go from a layer to lower ones."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "rankwise"
# Lowest first; a module may import its own layer and the ones before it.
LAYERS = [
    {"errors", "options", "configfile", "atomic", "architectures"},
    {"models"},
    {"data"},
    {"adapters"},
    {"routers", "merge", "compress", "quantize"},
    {"train", "mixture", "evaluate", "serve", "fed"},
    {"commands", "cli", "__init__"},
]
# A compressed or quantised model is a model: load_model reads one through compress.storage
# or quantize (lazily).
ALLOWED = {("models", "compress"), ("models", "quantize")}


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_imports_only_go_down_the_layers():
    wrong = []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC)
        top = relative.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rankwise."):
                target = node.module.split(".")[1]
                if layer_of(target) > layer_of(top) and (top, target) not in ALLOWED:
                    wrong.append(f"{relative} imports rankwise.{target}")
    assert not wrong, wrong


def test_no_source_file_is_long_without_saying_why():
    """Over ~300 lines a file must say in its first lines why it is one file."""
    long = []
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 320 and "one file" not in "\n".join(lines[:15]):
            long.append(f"{path.relative_to(SRC)}: {len(lines)} lines")
    assert not long, long
