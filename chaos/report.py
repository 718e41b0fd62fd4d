"""Figures of a chaos run, from the processes' records and the final table.

:func:`analyse` answers the run's questions: was any event lost, is anything
still pending, and why did any handler run more than once. A handler that
runs again after a *planned* failure is a retry, not a duplicate. Any other
repeat is a duplicate, and must be explained by an interrupted attempt:

* ``killed mid-task``: the earlier attempt's process was SIGKILLed before
  the handler returned;
* ``killed before write-back``: it was killed after the handler returned,
  before the outcome reached DynamoDB;
* ``write-back failed``: the outcome could not be written (DynamoDB errors
  outlasted the retries);
* ``lease expired before write-back``: the outcome arrived after the lease
  had expired and the event had been reclaimed, so the write-back was stale
  (a no-op).

A repeat that is none of these is ``unexplained``, and so is a second run
that started while the first attempt's lease was still live (``overlaps``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Invocation", "analyse", "invocations"]

PENDING = ("created", "active")


@dataclass
class Invocation:
    """One run of a handler body, and what became of it."""

    event_id: str
    token: str | None
    attempt: int
    pid: int
    started: int
    began: int | None
    """When the worker was about to mark the attempt started (renewing the
    lease for the processing timeout), if recorded."""
    ended: int | None = None
    ok: bool | None = None
    written: int | None = None
    """When the write-back returned (successfully), if it did."""
    outcome: str | None = None
    """What the write-back did: completed, retrying, failed or stale."""
    write_error: str | None = None
    deferred: bool = False
    """Whether the start mark was deferred (written after the body began):
    the lease then lasts at least until the claim's deadline, not a whole
    processing timeout from ``began``."""
    deadline: int | None = None
    """The claim's lease deadline, from the message."""
    reported_lost: int | None = None
    """When the worker's main process failed the attempt of this run's lost
    child (which ends its lease), if it did."""
    kind: str = field(default="first")
    """``first``, ``retry`` (after a planned failure) or ``duplicate``."""
    reason: str | None = None
    """Why a duplicate happened (see the module docstring)."""


def invocations(records: Iterable[dict[str, Any]]) -> dict[str, list[Invocation]]:
    """Every handler run per event id, in the order they started."""
    runs: dict[str, list[Invocation]] = defaultdict(list)
    by_token: dict[tuple[str | None, int], list[Invocation]] = defaultdict(list)
    later: list[dict[str, Any]] = []
    began: dict[tuple[str | None, int], int] = {}
    deferred: set[tuple[str | None, int]] = set()
    for rec in records:
        if rec["k"] == "begin":
            # A process records its begin, then its start, in that order.
            began[(rec.get("token"), int(rec["pid"]))] = int(rec["t"])
            if rec.get("deferred"):
                deferred.add((rec.get("token"), int(rec["pid"])))
        elif rec["k"] == "start":
            run = Invocation(
                rec["id"],
                rec.get("token"),
                int(rec.get("attempt", 1)),
                int(rec["pid"]),
                int(rec["t"]),
                began.get((rec.get("token"), int(rec["pid"]))),
                deferred=(rec.get("token"), int(rec["pid"])) in deferred,
                deadline=rec.get("deadline"),
            )
            runs[run.event_id].append(run)
            by_token[(run.token, run.pid)].append(run)
        elif rec["k"] in ("end", "wb"):
            later.append(rec)
    lost = [r for r in later if str(r.get("what", "")).startswith("lost")]
    for rec in later:
        if rec in lost:
            continue
        # ``end`` and ``wb`` come from the process that ran the body.
        matches = by_token.get((rec.get("token"), int(rec["pid"])), [])
        if rec["k"] == "end":
            ending = next((r for r in matches if r.ended is None), None)
            if ending is not None:
                ending.ended, ending.ok = int(rec["t"]), bool(rec["ok"])
            continue
        writing = next(
            (
                r
                for r in matches
                if r.ended is not None and r.written is None and r.write_error is None
            ),
            None,
        )
        if writing is None:
            continue
        if "error" in rec:
            writing.write_error = str(rec["error"])
        else:
            writing.written, writing.outcome = int(rec["t"]), rec.get("outcome")
    for rec in lost:
        if "error" in rec:
            continue
        # The worker's main process failed the attempt of a child it lost:
        # that ends the lease of the run that wrote nothing back.
        # A child killed after its handler returned, its completion still
        # in the buffer, is lost to the main process as well when it dies
        # before handing Celery the result: the report that changed the
        # item ends that lease too.
        ended = rec.get("outcome") != "stale"
        for (token, _), found in by_token.items():
            for run in found:
                unwritten = run.written is None or (ended and run.outcome == "buffered")
                if token == rec.get("token") and unwritten:
                    run.reported_lost = int(rec["t"])
    for event_runs in runs.values():
        event_runs.sort(key=lambda r: (r.started, r.attempt))
    return dict(runs)


def _classify(
    earlier: Invocation,
    run: Invocation,
    killed: set[int],
    skew_ms: int,
    timeout_ms: int,
) -> tuple[str, bool]:
    """Why ``run`` repeated ``earlier``, and whether their leases overlapped.

    ``earlier``'s lease was live for at least a processing timeout after it
    began (its start mark restarted the deadline), or, with a deferred start
    mark, until the claim's deadline if that is sooner, as the fastest clock
    sees it; a run of the event starting within that time, before
    ``earlier`` wrote back, started under a second live lease.
    """
    skew = max(skew_ms, 0)
    live_until = None
    if earlier.deferred and earlier.deadline is not None:
        # Unmarked, the lease ends at the claim's deadline; marked, a
        # processing timeout after the mark (after ``began``), by the
        # worker's clock, which may be earlier when a drainer whose clock
        # runs ahead made the claim.
        live_until = int(earlier.deadline) - skew
        if earlier.began is not None:
            live_until = min(live_until, earlier.began + timeout_ms - skew)
    elif earlier.began is not None:
        live_until = earlier.began + timeout_ms - skew
    # A buffered completion may have died with its process: its lease ended
    # only if it was written, which the records cannot tell.
    written = None if earlier.outcome == "buffered" else earlier.written
    ended_lease = written or earlier.reported_lost
    overlap = bool(
        live_until is not None
        and run.started < live_until
        and (ended_lease is None or ended_lease > run.started)
    )
    if earlier.outcome == "buffered" and earlier.pid in killed:
        # Its completion (and the start mark it replaced, if deferred) died
        # with the process; the lease expired unmarked and was sent again,
        # under the same token when the start mark had not been written.
        return "killed before its buffered write-back", overlap
    if earlier.token == run.token:
        return "unexplained: the same lease ran twice", overlap
    if earlier.ended is None:
        if earlier.pid in killed:
            return "killed mid-task", overlap
        return "unexplained: the attempt vanished mid-task", overlap
    if earlier.write_error is not None:
        return "write-back failed", overlap
    if earlier.written is None:
        if earlier.pid in killed:
            return "killed before write-back", overlap
        return "unexplained: no write-back and no kill", overlap
    if earlier.outcome == "buffered":
        return "unexplained: a buffered write-back was lost", overlap
    if earlier.outcome == "stale":
        # The store found another lease in place: the event was reclaimed.
        return "lease expired before write-back", overlap
    return f"unexplained: a live write-back ({earlier.outcome}) came first", overlap


def _story(event_id: str, item: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """An event's final item and every record naming it, for a failure message."""
    fields = {
        name: next(iter(value.values()))
        for name, value in item.items()
        if name in ("status", "gsiSortKey", "leaseToken", "runningSince",
                    "retryCount", "lastError", "startedOn")
    }  # fmt: skip
    seen = [
        f"{r['k']}@{r['t']}/{r['pid']}"
        + "".join(
            f" {k}={r[k]}" for k in ("token", "outcome", "what", "error") if k in r
        )
        for r in records
        if r.get("id") == event_id
    ]
    return f"{event_id} {fields} records: {seen}"


def analyse(
    records: list[dict[str, Any]],
    table: dict[str, dict[str, Any]],
    orders: set[str],
    *,
    skew_ms: int,
    timeout_ms: int,
) -> dict[str, Any]:
    """The run's figures; ``problems`` lists every broken promise.

    Args:
        records: every process's records (see :mod:`chaos.record`).
        table: the outbox table at the end, typed items by id.
        orders: the ids of the business items the emitter's transactions
            wrote beside their events.
        skew_ms: how far the skewed drainer's clock runs ahead.
        timeout_ms: the processing timeout (the length of a lease).
    """
    emitted: dict[str, str] = {}
    ordered: set[str] = set()
    errored: list[str] = []
    faults: Counter[str] = Counter()
    killed: set[int] = set()
    kills = restarts = skips = respawns = 0
    drains: Counter[str] = Counter()
    for rec in records:
        kind = rec["k"]
        if kind == "emit":
            emitted.update(zip(rec["ids"], rec["types"], strict=True))
            if rec.get("mode") == "order":
                ordered.update(rec["ids"])
        elif kind == "emit-error":
            errored.extend(rec["ids"])
        elif kind == "fault":
            faults[rec["kind"]] += 1
        elif kind == "kill":
            killed.add(int(rec["victim"]))
            kills += 1
        elif kind == "redis-restart":
            restarts += 1
        elif kind == "respawn":
            respawns += 1
        elif kind == "skip":
            skips += 1
        elif kind == "drain":
            drains[f"drains ({rec['by']})"] += 1
            for name in ("claimed", "skipped", "released", "failed"):
                drains[name] += int(rec.get(name, 0))
    # An emit that raised may still have been written (its reply was lost);
    # such an event is one the application will see again, not a lost one.
    stored_anyway = [i for i in errored if i in table]
    expected = set(emitted) | set(stored_anyway)

    status: Counter[str] = Counter()
    failed_by: Counter[str] = Counter()
    for event_id in expected:
        item = table.get(event_id)
        state = "missing" if item is None else item["status"]["S"]
        status[state] += 1
        if state == "failed":
            error = item["lastError"]["S"] if item else ""
            failed_by[error.split(":", 1)[0] or "?"] += 1

    runs = invocations(records)
    reasons: Counter[str] = Counter()
    overlaps = duplicates = 0
    overlapping: list[tuple[str, Invocation, Invocation]] = []
    handled = set()
    # A drainer whose clock runs ahead sees every lease end that much early.
    for event_id, event_runs in runs.items():
        for i, run in enumerate(event_runs):
            if run.ok:
                handled.add(event_id)
            if i == 0:
                continue
            earlier = event_runs[i - 1]
            if earlier.ok is False:
                run.kind = "retry"
                continue
            run.kind = "duplicate"
            duplicates += 1
            run.reason, overlap = _classify(earlier, run, killed, skew_ms, timeout_ms)
            reasons[run.reason] += 1
            overlaps += overlap
            if overlap:
                overlapping.append((event_id, earlier, run))

    completed_unhandled = sorted(
        i
        for i in expected
        if table.get(i, {}).get("status", {}).get("S") == "completed"
        and i not in handled
    )
    # Only a started attempt counts against the retries, so an event can
    # end failed only after its handler ran at least once.
    failed_unrun = sorted(
        i
        for i in expected
        if table.get(i, {}).get("status", {}).get("S") == "failed" and i not in runs
    )
    missing = sorted(i for i in expected if i not in table)
    lost = len(missing) + len(completed_unhandled)
    order_events = {o.removeprefix("order-") for o in orders}
    torn = sorted(ordered ^ (order_events & expected))

    unexplained = sum(n for r, n in reasons.items() if r.startswith("unexplained"))
    pending = sum(status[s] for s in PENDING)
    problems = []
    if lost:
        problems.append(
            f"{lost} events lost: missing {missing[:5]}, completed "
            f"without a successful handler run {completed_unhandled[:5]}"
        )
    if pending:
        stuck = sorted(
            i
            for i in expected
            if table.get(i, {}).get("status", {}).get("S") in PENDING
        )
        stories = "; ".join(_story(i, table[i], records) for i in stuck[:3])
        problems.append(f"{pending} events still pending at the end: {stories}")
    if unexplained:
        problems.append(f"{unexplained} duplicate invocations unexplained")
    if overlaps:
        # Both runs and the event's story, so that a failure can be read.
        told = "; ".join(
            f"{run.reason}: earlier {earlier}, then {run}; "
            + (_story(event_id, table[event_id], records) if event_id in table else "")
            for event_id, earlier, run in overlapping[:3]
        )
        problems.append(
            f"{overlaps} invocations started under a second live lease: {told}"
        )
    if failed_unrun:
        problems.append(
            f"{len(failed_unrun)} events failed without their handler ever "
            f"running: {failed_unrun[:5]}"
        )
    if torn:
        problems.append(f"{len(torn)} order transactions half-written: {torn[:5]}")
    poison = sum(1 for t in emitted.values() if t == "chaos.poison")
    return {
        "emitted": len(emitted),
        "emit_errors": len(errored),
        "emit_errors_stored_anyway": len(stored_anyway),
        "completed": status["completed"],
        "failed": status["failed"],
        "failed_by_error": dict(failed_by),
        "failed_without_running": len(failed_unrun),
        "poison_events": poison,
        "pending": pending,
        "lost": lost,
        "invocations": sum(len(r) for r in runs.values()),
        "retries_after_planned_failure": sum(
            1 for rs in runs.values() for r in rs if r.kind == "retry"
        ),
        "duplicate_invocations": duplicates,
        "duplicates_by_reason": dict(reasons),
        "unexplained_duplicates": unexplained,
        "overlapping_leases": overlaps,
        "skipped_messages": skips,
        "faults": {k: faults[k] for k in sorted(faults)},
        "worker_children_killed": kills,
        "redis_restarts": restarts,
        "processes_restarted": respawns,
        "drains": dict(drains),
        "orders": len(orders),
        "problems": problems,
    }
