"""Data: readers and validation, tokenisation with chat templates, the task suite, the corpus."""

from rankwise.data.corpus import python_docs
from rankwise.data.formatting import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_prompt,
    eos_id,
    format_prompt,
    pack_texts,
    pack_tokens,
    tokenize_texts,
)
from rankwise.data.readers import DataError, Records, read_records, record_problem
from rankwise.data.sources import load_dataset_spec
from rankwise.data.splits import SPLITS
from rankwise.data.tasks import TASKS, Task, get_task, mixed

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "TASKS",
    "DataError",
    "Records",
    "Task",
    "collate",
    "encode_example",
    "encode_prompt",
    "eos_id",
    "format_prompt",
    "get_task",
    "load_dataset_spec",
    "mixed",
    "pack_texts",
    "pack_tokens",
    "python_docs",
    "read_records",
    "record_problem",
    "tokenize_texts",
]
