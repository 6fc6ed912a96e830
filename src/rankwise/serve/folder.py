"""The adapter folder: every PEFT adapter in DIR is served under its folder's name.

Names are plain identifiers and every path read resolves inside DIR (symlinks leading out are
refused); only ``adapter_config.json`` and ``adapter_model.safetensors`` are read. A scan
registers folders that appeared or changed and unregisters folders that vanished; a folder that
fails to load (say, still being copied) is retried once its files change.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path

from rankwise.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from rankwise.errors import RankwiseError
from rankwise.serve.engine import Engine
from rankwise.serve.slots import HostAdapter

log = logging.getLogger("rankwise.serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
Signature = tuple[int, int, int, int]


def check_name(name: str) -> str:
    """Return ``name`` if it is a plain identifier, else raise naming the rule."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RankwiseError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


class AdapterFolder:
    """Keeps an engine's adapters in step with the sub-folders of one directory."""

    def __init__(self, root: str | os.PathLike, engine: Engine, base_name: str):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise RankwiseError(f"adapter directory '{root}' does not exist")
        self.engine, self.base_name = engine, base_name
        self.seen: dict[str, Signature | None] = {}  # name -> files' signature when last read
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def folder(self, name: str) -> Path:
        """The adapter folder for ``name``, checked to lie (with its files) inside the root."""
        check_name(name)
        if name == self.base_name:
            raise RankwiseError(f"'{name}' is the base model's name; rename the adapter folder")
        path = self.root / name
        for target in (path, path / CONFIG_FILE, path / WEIGHTS_FILE):
            if target.exists() and not target.resolve().is_relative_to(self.root):
                raise RankwiseError(f"adapter '{name}' links outside the adapter directory")
        if not path.is_dir():
            raise FileNotFoundError(f"no adapter folder '{name}' in the adapter directory")
        return path

    def add(self, name: str) -> HostAdapter:
        """Read DIR/name, validate it against the base model and serve it (replacing any old)."""
        with self.lock:
            path = self.folder(name)
            signature = files_signature(path)
            adapter = self.engine.register(name, read_adapter(path))
            self.seen[name] = signature
        log.info("serving adapter '%s' (rank %d)", name, adapter.rank)
        return adapter

    def remove(self, name: str) -> bool:
        """Stop serving ``name``; a scan re-adds it only once its files change."""
        with self.lock:
            return self.engine.unregister(check_name(name))

    def scan(self) -> None:
        """Register new or changed adapter folders and unregister vanished ones."""
        present: set[str] = set()
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not NAME.fullmatch(entry.name) or not os.path.isfile(Path(entry.path, WEIGHTS_FILE)):
                continue
            present.add(entry.name)
            signature = files_signature(Path(entry.path))
            if self.seen.get(entry.name, ()) == signature:
                continue
            try:
                self.add(entry.name)
            except (RankwiseError, OSError) as err:
                log.warning("skipping adapter folder '%s': %s", entry.name, err)
                with self.lock:
                    self.seen[entry.name] = signature
        for name in set(self.seen) - present:
            with self.lock:
                del self.seen[name]
                self.engine.unregister(name)
            log.info("adapter '%s' left the adapter directory; no longer served", name)

    def watch(self, interval: float) -> None:
        """Scan every ``interval`` seconds in a background thread until ``stop``."""

        def loop() -> None:
            while not self.stopped.wait(interval):
                try:
                    self.scan()
                except OSError as err:
                    log.warning("cannot scan the adapter directory: %s", err)

        self.thread = threading.Thread(target=loop, name="rankwise-adapter-scan", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()


def largest_rank(root: str | os.PathLike) -> int:
    """The largest rank the adapter configs under ``root`` declare (0 if none)."""
    largest = 0
    for config in Path(root).glob(f"*/{CONFIG_FILE}"):
        try:
            data = json.loads(config.read_text())
            ranks = [data.get("r", 0), *(data.get("rank_pattern") or {}).values()]
            largest = max(largest, *(int(r) for r in ranks))
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # the scan reports broken adapters
    return largest


def files_signature(path: Path) -> Signature | None:
    """Modification times and sizes of an adapter's two files (None if one is missing)."""
    try:
        config, weights = (path / CONFIG_FILE).stat(), (path / WEIGHTS_FILE).stat()
    except OSError:
        return None
    return (config.st_mtime_ns, config.st_size, weights.st_mtime_ns, weights.st_size)
