"""A drain loop: ``outbox.drain()`` every poll interval until SIGTERM.

Run by ``chaos/run.py`` with ``CHAOS_SKEW_MS`` set, as the drainer whose
clock disagrees with everyone else's.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from chaos.app import outbox, record

__all__ = ["main"]


def main() -> None:
    """Drain until SIGTERM; log errors and go on, as beat would."""
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    interval_s = outbox.config.poll_interval_ms / 1000
    record("drainer-started")
    while not stop.is_set():
        began = time.monotonic()
        try:
            summary = outbox.drain()
        except Exception as exc:  # the next drain tries again
            record("drain-error", error=repr(exc))
        else:
            took_ms = round((time.monotonic() - began) * 1000)
            record("drain", by="loop", took_ms=took_ms, **summary)
        # The loop's pace, like beat's schedule; nothing waits on it.
        stop.wait(interval_s)


if __name__ == "__main__":
    main()
