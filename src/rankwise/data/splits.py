"""Deterministic train/validation/test assignment by hashing a key (a topic name, a prompt)."""

import hashlib

from rankwise.errors import RankwiseError

SPLITS = ("train", "validation", "test")


def split_of(key: str) -> str:
    """The split `key` belongs to: 10% test, 10% validation, 80% train, by SHA-256 of the key."""
    # Python's hash() is salted per process; SHA-256 gives the same split on every run and machine.
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def check_split(split: str) -> None:
    """Raise a RankwiseError unless `split` is one of train, validation, test."""
    if split not in SPLITS:
        raise RankwiseError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
