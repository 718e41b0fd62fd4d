"""Append-only records of what each chaos process did.

Every process writes JSON lines to a file of its own in the run's folder, so
nothing is shared between processes and a line written before a SIGKILL
survives it. The orchestrator reads them all once the processes are gone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Recorder", "now_ms", "read_all"]


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of lease deadlines."""
    return time.time_ns() // 1_000_000


class Recorder:
    """Writes one JSON line per record to ``<folder>/<role>-<pid>.jsonl``.

    The file is reopened after a fork, so a prefork child never writes into
    its parent's file.
    """

    def __init__(self, folder: str | Path, role: str) -> None:
        self.folder = Path(folder)
        self.role = role
        self._pid = 0
        self._file: Any = None
        self._lock = threading.Lock()

    def __call__(self, what: str, /, **fields: Any) -> None:
        """Record one ``what`` (a kind of record) with its ``fields``, at once."""
        line = json.dumps(
            {"k": what, "t": now_ms(), "pid": os.getpid(), **fields},
            separators=(",", ":"),
        )
        with self._lock:
            if self._pid != os.getpid():
                path = self.folder / f"{self.role}-{os.getpid()}.jsonl"
                # Line-buffered: each record reaches the kernel when written,
                # so a SIGKILL loses at most the line being written.
                self._file = path.open("a", buffering=1, encoding="utf-8")
                self._pid = os.getpid()
            self._file.write(line + "\n")


def read_all(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of every process, file by file.

    A process killed mid-write may leave a partial last line; it is skipped.
    """
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue
