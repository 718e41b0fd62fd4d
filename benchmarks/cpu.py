"""CPU time of the benchmark's processes, to show where an event's cost goes.

On a machine where DynamoDB Local, the worker and the producer share the same
cores, end-to-end throughput is bounded by the CPU each event costs all of
them together; these figures show the split. They read ``/proc`` and are
None elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CpuMeter", "tree_cpu_s"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _own_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu_s(pid: int) -> float | None:
    """User and system CPU seconds of ``pid`` and its live descendants."""
    if not Path(f"/proc/{pid}/stat").exists():
        return None
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += _own_cpu_s(current)
        todo += _children(current)
    return total


class CpuMeter:
    """CPU seconds of named process trees (this process: ``os.times``)."""

    def __init__(self, **pids: int | None) -> None:
        self.pids = pids

    def read(self) -> dict[str, float | None]:
        """The CPU seconds of each tree now."""
        times = os.times()
        seen: dict[str, float | None] = {
            name: None if pid is None else tree_cpu_s(pid)
            for name, pid in self.pids.items()
        }
        seen["producer"] = times.user + times.system
        return seen

    @staticmethod
    def per_event_ms(
        before: dict[str, float | None], after: dict[str, float | None], events: int
    ) -> dict[str, float | None]:
        """Milliseconds of CPU per event in each tree between two reads."""
        result: dict[str, float | None] = {}
        for name, start in before.items():
            end = after.get(name)
            if start is None or end is None:
                result[name] = None
            else:
                result[name] = round((end - start) * 1000 / events, 2)
        return result
