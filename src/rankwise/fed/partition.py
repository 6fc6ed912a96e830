"""Splitting one data spec over the clients with flwr-datasets' partitioners (node-local files).

``iid`` (``IidPartitioner``), ``dirichlet:ALPHA`` over the records' task (``DirichletPartitioner``,
the usual non-IID label skew) and ``task`` (``NaturalIdPartitioner``: one task per client, as
many clients as tasks). Each partition is written as ``client-K.jsonl``; a simulated client
reads its own file, as a deployed one reads ``--data PATH``: no data travels in a message.
"""

from __future__ import annotations

import json
from pathlib import Path

from rankwise.atomic import atomic_file
from rankwise.data import load_dataset_spec
from rankwise.errors import RankwiseError
from rankwise.fed.flower import need_flower


def partitioner(spec: str, clients: int, seed: int):
    need_flower("datasets")
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if spec == "iid":
        return IidPartitioner(num_partitions=clients)
    if spec == "task":
        return NaturalIdPartitioner(partition_by="task")
    alpha = float(spec.partition(":")[2])
    return DirichletPartitioner(
        num_partitions=clients, partition_by="task", alpha=alpha, min_partition_size=1, seed=seed
    )


def write_partitions(
    data: str, spec: str, clients: int, folder: Path, examples: int, seed: int
) -> list[str]:
    """Partition the training records of ``data``; returns each client's file."""
    from datasets import Dataset

    records = load_dataset_spec(data, split="train", n=examples).records
    if spec != "iid" and not all("task" in r for r in records):
        raise RankwiseError(f"partition {spec} splits by task: '{data}' has records without one")
    split = partitioner(spec, clients, seed)
    split.dataset = Dataset.from_list(records)
    if split.num_partitions != clients:
        raise RankwiseError(
            f"partition task gives one client per task: '{data}' has {split.num_partitions} tasks, "
            f"but clients is {clients}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(clients):
        rows = split.load_partition(k).to_list()
        text = "".join(json.dumps(row) + "\n" for row in rows)
        path = folder / f"client-{k}.jsonl"
        atomic_file(path, lambda tmp, text=text: tmp.write_text(text))
        paths.append(str(path))
    return paths
