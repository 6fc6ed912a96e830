"""Read and validate training records from JSON lines, JSON, text, Parquet, CSV or a saved dataset.

A record has one of three shapes (extra keys such as ``task`` are kept):

    {"text": str}                                   plain text, every token is learned
    {"prompt": str, "completion": str}              only the completion is learned
    {"messages": [{"role": ..., "content": str}]}   only the assistant turns are learned

The shape is chosen by key, in that precedence: ``messages``, then ``prompt``/``completion``,
then ``text``. In tabular sources (Parquet, CSV, saved datasets) a missing cell reads as None
and counts as an absent key, so one table may mix shapes.
"""

import csv
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.csv
from pyarrow import parquet

from rankwise.errors import RankwiseError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")


class DataError(RankwiseError):
    """A data source is missing, empty, unreadable or holds a malformed record."""


@dataclass(frozen=True)
class Records:
    """The valid records of one source, and how many malformed ones were skipped."""

    records: list[dict]
    skipped: int
    source: str

    def __len__(self) -> int:
        return len(self.records)


# A source yields (number, value, problem): the 1-based line/item/row number, the parsed value,
# and a parse problem (then value is None) or None.
Rows = Iterator[tuple[int, Any, str | None]]


def read_records(path: str | Path, *, skip_bad_lines: bool = False) -> Records:
    """Read and validate every record of a file or a `save_to_disk` folder at `path`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Data path {path} does not exist.")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path} is empty.")
    unit, rows = _open(path)
    records, problems = [], []
    for number, value, problem in rows:
        problem = problem or record_problem(value)
        if problem is None:
            records.append(value)
            continue
        message = f"{path}, {unit} {number}: {problem}"
        if not skip_bad_lines:
            raise DataError(message + ".")
        problems.append(message)
    if not records:
        if problems:
            raise DataError(
                f"{path} holds no valid records: all {len(problems)} are malformed "
                f"(first: {problems[0]})."
            )
        raise DataError(f"{path} holds no records.")
    if problems:
        log.warning("Skipped %d malformed records; first: %s", len(problems), problems[0])
    return Records(records=records, skipped=len(problems), source=str(path))


def record_problem(record: Any) -> str | None:
    """What is wrong with `record` as a text, prompt/completion or messages record, or None."""
    if not isinstance(record, dict):
        return f"expected an object, got {_type_name(record)}"
    if "messages" in record:
        return _messages_problem(record["messages"])
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                return f"has {_other(key)!r} but no {key!r}"
            if not isinstance(record[key], str):
                return f"{key!r} must be a string, got {_type_name(record[key])}"
        return "'completion' is empty" if not record["completion"] else None
    if "text" in record:
        if not isinstance(record["text"], str):
            return f"'text' must be a string, got {_type_name(record['text'])}"
        return "'text' is empty" if not record["text"].strip() else None
    keys = ", ".join(sorted(map(str, record))) or "none"
    return f"needs 'text', 'prompt' and 'completion', or 'messages' (found keys: {keys})"


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'messages' must be a non-empty list, got {_type_name(messages)}"
    for index, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {index} must be an object with 'role' and 'content'"
        if message["role"] not in ROLES:
            expected = ", ".join(ROLES)
            return f"message {index} has unknown role {message['role']!r} (expected {expected})"
        if not isinstance(message["content"], str):
            found = _type_name(message["content"])
            return f"message {index} content must be a string, got {found}"
    if not any(message["role"] == "assistant" for message in messages):
        return "'messages' has no assistant message to learn from"
    return None


def _other(key: str) -> str:
    return "completion" if key == "prompt" else "prompt"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _open(path: Path) -> tuple[str, Rows]:
    """The numbering unit and the rows of `path`, chosen by its kind."""
    if path.is_dir():
        return "row", _saved_dataset_rows(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "line", _json_lines(path)
    if suffix == ".json":
        # A .json file may hold one JSON list or, as Hugging Face writes them, JSON lines.
        with path.open("rb") as file:
            starts_with_list = file.read(4096).lstrip().startswith(b"[")
        return ("item", _json_list(path)) if starts_with_list else ("line", _json_lines(path))
    if suffix == ".txt":
        return "file", _text_file(path)
    if suffix == ".parquet":
        return "row", _parquet_rows(path)
    if suffix == ".csv":
        return "row", _csv_rows(path)
    raise DataError(
        f"Cannot read {path}: expected one of {', '.join(FILE_SUFFIXES)} "
        "or a folder written by datasets' save_to_disk."
    )


def _json_lines(path: Path) -> Rows:
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None, "not valid UTF-8"
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as err:
                yield number, None, f"not valid JSON ({err.msg} at column {err.colno})"


def _json_list(path: Path) -> Rows:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 ({err.reason}).") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}).") from err
    if not isinstance(items, list):
        raise DataError(f"{path} must hold a JSON list of records, got {_type_name(items)}.")
    for number, item in enumerate(items, 1):
        yield number, item, None


def _text_file(path: Path) -> Rows:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 ({err.reason}).") from err
    if text.strip():
        yield 1, {"text": text}, None


def _parquet_rows(path: Path) -> Rows:
    yield from _table_rows(path, lambda: parquet.read_table(path))


def _csv_rows(path: Path) -> Rows:
    def load() -> pyarrow.Table:
        with path.open(newline="", encoding="utf-8") as file:
            header = next(csv.reader(file), [])
        # Every column is text: type inference would turn an answer like "42" into the number 42.
        convert = pyarrow.csv.ConvertOptions(
            column_types={name: pyarrow.string() for name in header}, strings_can_be_null=True
        )
        parse = pyarrow.csv.ParseOptions(newlines_in_values=True)
        return pyarrow.csv.read_csv(path, parse_options=parse, convert_options=convert)

    yield from _table_rows(path, load)


def _table_rows(path: Path, load: Callable[[], pyarrow.Table]) -> Rows:
    try:
        rows = load().to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's errors derive from these; so do decode errors
        reason = " ".join(str(err).split()).rstrip(".")
        raise DataError(f"Cannot read {path}: {reason}.") from err
    yield from _drop_missing(rows)


def _saved_dataset_rows(path: Path) -> Rows:
    try:
        dataset = datasets.load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError as err:
        raise DataError(
            f"{path} is a folder but not one written by datasets' save_to_disk."
        ) from err
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise DataError(
            f"{path} holds several splits ({splits}); point at one split's folder, "
            f"e.g. {path / next(iter(dataset), 'train')}."
        )
    yield from _drop_missing(dataset.to_list())


def _drop_missing(rows: list[dict]) -> Rows:
    for number, row in enumerate(rows, 1):
        yield number, {key: value for key, value in row.items() if value is not None}, None
