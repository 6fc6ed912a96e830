"""Resolve a dataset spec (a built-in task, the built-in corpus, or a path) to records."""

from rankwise.data.corpus import python_docs
from rankwise.data.readers import Records, read_records
from rankwise.data.splits import check_split
from rankwise.data.tasks import TASKS, mixed
from rankwise.errors import RankwiseError

CORPORA = {"python-docs": python_docs}
# Examples per task when a task spec gives no size.
TASK_SIZES = {"train": 1000, "validation": 100, "test": 200}


def load_dataset_spec(
    spec: str, *, split: str = "train", n: int | None = None, skip_bad_lines: bool = False
) -> Records:
    """Records for `spec`: `task:NAME[,NAME...]` or `task:all`, `corpus:python-docs`, or a path.

    `split` picks the part of a built-in source (a path is read whole); `n` is the number of
    examples per task (task specs only); task records carry their task's name under "task".
    """
    check_split(split)
    kind, _, name = spec.partition(":")
    if kind == "task":
        names = list(TASKS) if name == "all" else name.split(",")
        records = mixed(names, n_per_task=TASK_SIZES[split] if n is None else n, split=split)
        return Records(records=records, skipped=0, source=spec)
    if kind == "corpus":
        if name not in CORPORA:
            raise RankwiseError(f"Unknown corpus {name!r}; available: {', '.join(CORPORA)}.")
        texts = CORPORA[name](split)
        return Records(records=[{"text": text} for text in texts], skipped=0, source=spec)
    return read_records(spec, skip_bad_lines=skip_bad_lines)
