"""The chaos emitter: writes N events the three ways an application does.

``python -m chaos.emitter N RATE SEED ORDERS_TABLE`` emits N events at about
RATE per second: single emits (one ``PutItem``), batches of 2-10 (one
``TransactWriteItems``) and business transactions that put an order item
and its event together. Types are mostly ``chaos.work``, with a few
``chaos.flaky`` and ``chaos.poison``. Each write is recorded (``emit``, or
``emit-error`` when the call raised) with the ids it carried.
"""

from __future__ import annotations

import random
import sys
import time

from celery_outbox import Event
from chaos.app import outbox, record

__all__ = ["main", "pick_type"]


def pick_type(rng: random.Random) -> str:
    """Mostly work that succeeds; 3% fails once, 1% always fails."""
    roll = rng.random()
    if roll < 0.01:
        return "chaos.poison"
    if roll < 0.04:
        return "chaos.flaky"
    return "chaos.work"


def main(argv: list[str]) -> None:
    """Emit ``argv[0]`` events at ``argv[1]`` per second, seeded by ``argv[2]``."""
    total, rate, seed, orders = int(argv[0]), float(argv[1]), int(argv[2]), argv[3]
    rng = random.Random(seed)
    started = time.monotonic()
    sent = 0
    while sent < total:
        size = min(total - sent, rng.choice([1, 1, 1, 2, 5, 10]))
        events = [Event.new(pick_type(rng), {"n": sent + i}) for i in range(size)]
        mode = "put" if size == 1 else "batch"
        if size == 1 and rng.random() < 0.5:
            mode = "order"
        ids = [e.id for e in events]
        try:
            if mode == "order":
                with outbox.transaction() as tx:
                    tx.put(orders, {"id": f"order-{ids[0]}", "event": ids[0]})
                    outbox.publish(events)
            else:
                outbox.publish(events)
        except Exception as exc:
            record("emit-error", ids=ids, mode=mode, error=repr(exc))
        else:
            record("emit", ids=ids, types=[e.type for e in events], mode=mode)
        sent += size
        # Pace the writes so emission overlaps the whole chaos window.
        ahead_s = sent / rate - (time.monotonic() - started)
        if ahead_s > 0:
            time.sleep(ahead_s)
    record("emitter-done", sent=sent)


if __name__ == "__main__":
    main(sys.argv[1:])
