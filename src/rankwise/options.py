"""One way to configure every verb: typed option classes whose fields are YAML keys and flags.

An options class is a dataclass subclass of ``Options`` whose fields are declared with
``option(default, help, choices=..., within=...)``. The same declaration gives

- validation: types (a YAML ``yes`` is not a rank), bounds (``within="[1, inf)"``), choices
  (a list, or a function returning a registry's names) and ``check()`` for rules across fields;
- ``from_mapping``: unknown keys are an error that lists the known ones;
- ``add_flags``: one ``--flag`` per field (underscores become dashes), with a help line that
  states the effect, the default and the choices;
- ``from_args``: a YAML file's values, overridden by every flag given on the command line.

Lists are comma-separated on the command line; mappings (``rank_pattern``) are YAML-only.
Verbs with many methods take each method's settings flat (``method_settings``). It is one file
because declaration, validation and flag generation are one mechanism read together.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Self

from rankwise.configfile import load_yaml
from rankwise.errors import RankwiseError

INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+|-inf)\s*,\s*(-?[\d.e+-]+|inf)\s*([\])])$")
FLAGLESS = "flagless"  # metadata key: a field set only from YAML or code (a mapping, say)


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | Callable[[], Iterable[str]] | None = None,
    within: str | None = None,
    parse: Callable[[str], Any] | None = None,
    spaced: bool = False,
) -> Any:
    """Declare one setting: its default, a one-line effect, allowed choices and bounds.

    ``within`` is an interval such as ``"[0, 1)"`` or ``"(0, inf)"``; ``parse`` turns the
    command-line text into the value where the type alone does not say how; a list setting
    that is ``spaced`` also takes its items as separate words (``--weights 0.5 1.5``).
    """
    metadata = {
        "help": help,
        "choices": choices,
        "within": within,
        "parse": parse,
        "spaced": spaced,
    }
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class Options:
    """Base of every options class: validates itself and knows its flags."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = coerce(getattr(self, f.name), hints[f.name], f.name)
            setattr(self, f.name, value)
            check_value(f, value)
        self.check()

    def check(self) -> None:
        """Rules across fields; raise ``RankwiseError``. Overrides call ``super().check()``."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> Self:
        """An instance from a mapping (a YAML file, a saved record); unknown keys fail."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise RankwiseError(
                f"unknown config keys {unknown} in {source}; known keys: {', '.join(known)}"
            )
        return cls(**values)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
        """One ``--flag`` per field (except ``skip``), unset by default so YAML can fill it."""
        hints = typing.get_type_hints(cls)
        taken = {a.dest for a in parser._actions}
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name in taken or f.metadata.get(FLAGLESS):
                continue
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                type=flag_parser(f, hints[f.name]),
                nargs="+" if f.metadata.get("spaced") else None,
                metavar=metavar(f, hints[f.name]),
                help=help_line(f),
            )

    @classmethod
    def values_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The fields of ``cls`` that were given as flags, by name."""
        given = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if f.metadata.get("spaced") and value is not None:
                value = [item for word in value for item in word]  # each word is a list
            if value not in (None, []):
                given[f.name] = value
        return given

    @classmethod
    def from_args(cls, args: argparse.Namespace, config_file: str | None = None) -> Self:
        """The YAML file's values (if any) overridden by every flag given on the command line."""
        values = load_yaml(config_file) if config_file else {}
        return cls.from_mapping(values | cls.values_from_args(args), config_file or "flags")

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (what checkpoints and saved records store)."""
        return dataclasses.asdict(self)


def method_settings(
    values: Mapping[str, Any],
    own: Iterable[str],
    methods: Mapping[str, type[Options]],
    chosen: str | None,
    what: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split flat settings into a verb's own and those of the method it chose.

    A verb with many methods (``compress --method``, ``merge --method``) takes every method's
    settings as flat keys and flags; a key of another method is an error that says whose it is,
    and a key nobody declares is the usual unknown-key error.
    """
    own = set(own)
    chosen_fields = set(methods[chosen].__dataclass_fields__) if chosen in methods else set()
    mine, theirs = {}, {}
    for key, value in values.items():
        if key in own:
            mine[key] = value
        elif key in chosen_fields:
            theirs[key] = value
        else:
            owners = [n for n, cls in methods.items() if key in cls.__dataclass_fields__]
            if owners:
                raise RankwiseError(
                    f"'{key}' is a setting of {what} {', '.join(owners)}, not of {chosen}"
                )
            mine[key] = value  # unknown: the verb's own from_mapping names it
    return mine, theirs


def add_method_flags(parser: argparse.ArgumentParser, methods: Mapping[str, type[Options]]) -> None:
    """Every method's settings as flags, each name once (its help from the first declaring it)."""
    for cls in methods.values():
        cls.add_flags(parser)


def method_values_from_args(
    args: argparse.Namespace, methods: Mapping[str, type[Options]]
) -> dict[str, Any]:
    """The method settings given as flags, by name."""
    values: dict[str, Any] = {}
    for cls in methods.values():
        values |= cls.values_from_args(args)
    return values


def flagless(default: Any, help: str) -> Any:
    """A setting with no command-line flag (a mapping, set in YAML or code)."""
    declared = option(default, help)
    declared.metadata = types.MappingProxyType({**declared.metadata, FLAGLESS: True})
    return declared


def choices_of(f: dataclasses.Field) -> list[str] | None:
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def check_value(f: dataclasses.Field, value: Any) -> None:
    """Raise if ``value`` is outside the field's choices or bounds."""
    name, flag = f.name, f"(flag --{f.name.replace('_', '-')})"
    choices = choices_of(f)
    if choices is not None and value is not None:
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                raise RankwiseError(
                    f"unknown {f.name} '{item}': choose one of {', '.join(choices)}"
                )
    within = f.metadata.get("within")
    if within and value is not None:
        low_closed, low, high, high_closed = interval(within)
        for item in value if isinstance(value, list) else [value]:
            below = item < low if low_closed else item <= low
            above = item > high if high_closed else item >= high
            if below or above:
                raise RankwiseError(f"{name} must be in {within}, got {item} {flag}")


def interval(text: str) -> tuple[bool, float, float, bool]:
    """(low closed, low, high, high closed) of an interval written like ``"[0, 1)"``."""
    found = INTERVAL.match(text)
    if found is None:
        raise ValueError(f"bad interval {text!r}")
    return found[1] == "[", float(found[2]), float(found[3]), found[4] == "]"


def kinds(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a type hint (``int | None`` -> (int, NoneType))."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against the hint; ints become floats where a float is expected.

    A bool is never a number, and a YAML scalar where a list is expected stays an error unless
    the hint also allows the scalar.
    """
    for kind in kinds(hint):
        if kind is type(None) and value is None:
            return None
        if kind is typing.Any:
            return value
        origin = typing.get_origin(kind)
        if origin is list and isinstance(value, list | tuple):
            (item,) = typing.get_args(kind)
            try:
                return [coerce(v, item, name) for v in value]
            except RankwiseError:
                continue
        if origin is dict and isinstance(value, dict):
            key_kind, item = typing.get_args(kind)
            try:
                return {coerce(k, key_kind, name): coerce(v, item, name) for k, v in value.items()}
            except RankwiseError:
                continue
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                break
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    flag = f"--{name.replace('_', '-')}"
    raise RankwiseError(f"{name} must be {describe(hint)}, got {value!r} (flag {flag})")


def describe(hint: Any) -> str:
    """A type hint in words: ``int | None`` -> "int or none", ``list[float]`` -> "a list of
    float"."""
    words = {int: "int", float: "float (a number)", bool: "bool (true or false)", str: "str"}
    parts = []
    for kind in kinds(hint):
        if kind is type(None):
            parts.append("none")
        elif typing.get_origin(kind) is list:
            parts.append(f"a list of {describe(typing.get_args(kind)[0]).split(' (')[0]}")
        elif typing.get_origin(kind) is dict:
            parts.append("a mapping")
        else:
            parts.append(words.get(kind, getattr(kind, "__name__", str(kind))))
    return " or ".join(parts)


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_parser(f: dataclasses.Field, hint: Any) -> Callable[[str], Any]:
    """How a flag's text becomes a value: the field's ``parse``, else by its type."""
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    alternatives = [k for k in kinds(hint) if k is not type(None)]
    scalars = [k for k in alternatives if k in (bool, int, float, str)]
    lists = [typing.get_args(k)[0] for k in alternatives if typing.get_origin(k) is list]

    def parse(text: str) -> Any:
        if lists and ("," in text or not scalars or f.metadata.get("spaced")):
            return [scalar(part, lists[0]) for part in text.split(",") if part]
        return scalar(text, scalars[0] if scalars else str)

    return parse


def scalar(text: str, kind: type) -> Any:
    """One command-line word as a bool, int, float or str."""
    if kind is bool:
        return parse_bool(text)
    try:
        return kind(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {describe(kind)}, got {text!r}") from err


def metavar(f: dataclasses.Field, hint: Any) -> str:
    choices = choices_of(f)
    if choices is not None:
        return "{" + ",".join(choices) + "}"
    alternatives = [k for k in kinds(hint) if k is not type(None)]
    if any(typing.get_origin(k) is list for k in alternatives):
        return "A,B,..."
    names = {bool: "BOOL", int: "INT", float: "FLOAT"}
    return names.get(alternatives[0], f.name.upper()) if alternatives else f.name.upper()


def help_line(f: dataclasses.Field) -> str:
    """The field's effect, then its default and bounds (``%`` escaped for argparse)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    extra = f"default: {shown}" if default not in (None, "", []) else "default: unset"
    if f.metadata.get("within"):
        extra += f"; within {f.metadata['within']}"
    return f"{f.metadata.get('help', f.name)} ({extra})".replace("%", "%%")


class MethodSettings:
    """For a verb whose ``method`` picks an entry of a registry of ``Options`` classes: every
    entry's settings are flat flags and YAML keys, gathered into the verb's ``settings`` (a
    setting of another method is an error). Put it before the ``Options`` base."""

    @classmethod
    def methods(cls) -> Mapping[str, type[Options]]:
        """The registry the ``method`` field chooses from."""
        raise NotImplementedError

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> Self:
        own, settings = method_settings(
            values, cls.__dataclass_fields__, cls.methods(), values.get("method"), "method"
        )
        return super().from_mapping({**own, "settings": settings}, source)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
        super().add_flags(parser, skip)
        add_method_flags(parser, cls.methods())

    @classmethod
    def from_args(cls, args: argparse.Namespace, config_file: str | None = None) -> Self:
        values = load_yaml(config_file) if config_file else {}
        values |= cls.values_from_args(args) | method_values_from_args(args, cls.methods())
        return cls.from_mapping(values, config_file or "flags")
