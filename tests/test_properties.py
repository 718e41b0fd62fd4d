"""Lease invariants under random interleavings of several actors (hypothesis).

Three :class:`OutboxStore` instances, each with its own DynamoDB client, share
one table and one fake clock. Hypothesis interleaves emits, claims, handler
starts, completes, fails, releases, operator retries and clock jumps (which
expire leases), and after every step the table is read back and checked against a model:

* no event leaves the status index before completion: every stored event is
  ``created``, ``active`` with a finite deadline, or ``failed``, and the index
  query of its status finds it;
* at most one live lease per event: a claim is granted only when the lease
  the model last saw for that event (renewed when its handler began) has
  expired or been written back, and the token in the table is always the
  one of the latest grant;
* an expired lease costs a retry only if its handler had begun;
* a write-back, release or retry from a stale lease changes nothing: the item
  is the same before and after, and the outcome says ``stale``.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from celery_outbox import (
    Completion,
    Event,
    Lease,
    OutboxConfig,
    OutboxStore,
    Outcome,
    Status,
)
from celery_outbox.store import make_client

TIMEOUT_MS = 1000
ACTORS = 3
# Real time, not a fixed date: kept completed events get a TTL from this
# clock, and DynamoDB Local's TTL sweeper deletes items whose TTL is past.
START_MS = int(time.time() * 1000)
PENDING = (Status.CREATED.value, Status.ACTIVE.value, Status.FAILED.value)

SEEN: Counter[str] = Counter()
"""How often each interesting interleaving happened, over all examples."""

_shared: dict[str, tuple[str, list[Any]]] = {}


def table_and_clients(endpoint: str) -> tuple[str, list[Any]]:
    """A table and one client per actor, made once per endpoint.

    Making clients and tables is slow next to the steps themselves, so the
    examples share them; each example empties the table when it ends.
    """
    if endpoint not in _shared:
        config = OutboxConfig(
            table_name=f"prop-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint
        )
        made = [make_client(config) for _ in range(ACTORS + 1)]
        OutboxStore(config, client=made[0]).create_table()
        _shared[endpoint] = (config.table_name, made)
    return _shared[endpoint]


class FakeClock:
    """Milliseconds that move only when a rule says so; shared by all actors."""

    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


def seen(label: str) -> None:
    """Count an interleaving worth covering, for hypothesis and for the test."""
    note_event(label)
    SEEN[label] += 1


def _status(item: dict[str, Any] | None) -> str | None:
    return None if item is None else str(item["status"]["S"])


def _token(item: dict[str, Any] | None) -> str | None:
    return None if item is None else item.get("leaseToken", {}).get("S")


def _sort_key(item: dict[str, Any]) -> int:
    return int(item["gsiSortKey"]["N"])


def _rounds(item: dict[str, Any]) -> int:
    return int(item.get("operatorRetries", {"N": "0"})["N"])


def _retries(item: dict[str, Any]) -> int:
    return int(item.get("retryCount", {"N": "0"})["N"])


class LeaseMachine(RuleBasedStateMachine):
    """Several actors racing over one outbox table, checked after every step."""

    endpoint: ClassVar[str] = ""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.actors: list[OutboxStore] = []
        self.reader: OutboxStore | None = None
        self.emitted: list[str] = []
        self.completed: set[str] = set()
        self.live: dict[str, Lease] = {}
        """The lease whose token the table holds, per active event."""
        self.snapshot: dict[str, dict[str, Any]] | None = None
        """The table as the last invariant check read it."""
        self.rounds: dict[str, int] = {}
        """How many times an operator retried each event."""

    # -- set-up ---------------------------------------------------------------

    @initialize(
        completion=st.sampled_from(list(Completion)),
        max_retries=st.integers(0, 2),
        first_events=st.integers(1, 6),
    )
    def make_table(
        self, completion: Completion, max_retries: int, first_events: int
    ) -> None:
        """An empty table, one store per actor on it, and a few events."""
        table, made = table_and_clients(self.endpoint)
        config = OutboxConfig(
            table_name=table,
            endpoint_url=self.endpoint,
            processing_timeout_ms=TIMEOUT_MS,
            max_retries=max_retries,
            base_backoff_ms=50,
            max_backoff_ms=200,
            batch_size=3,
            completion=completion,
        )
        self.actors = [
            OutboxStore(config, client=made[i], clock=self.clock, rng=random.Random(i))
            for i in range(ACTORS)
        ]
        self.reader = OutboxStore(config, client=made[ACTORS], clock=self.clock)
        assert not self.scan(), "the previous example left items behind"
        self.emit(0, first_events)

    def teardown(self) -> None:
        if self.reader is not None:
            items = self.scan()
            try:
                # The checks after each step see status and a numeric sort
                # key, which is what puts an item in the index; ask the
                # index itself once per example.
                for status in PENDING:
                    listed = {i for i, it in items.items() if _status(it) == status}
                    assert self.indexed(status) == listed, f"index misses {status}"
            finally:
                ids = list(items)
                for start in range(0, len(ids), 25):
                    self.reader.batch_delete(ids[start : start + 25])

    @property
    def store(self) -> OutboxStore:
        assert self.reader is not None
        return self.reader

    @property
    def config(self) -> OutboxConfig:
        return self.store.config

    def before(self) -> dict[str, dict[str, Any]]:
        """The table now: as last read, since nothing wrote to it after that."""
        return self.snapshot if self.snapshot is not None else self.scan()

    def scan(self) -> dict[str, dict[str, Any]]:
        """Every item of the table, read consistently."""
        items: dict[str, dict[str, Any]] = {}
        kwargs: dict[str, Any] = {"TableName": self.store.table, "ConsistentRead": True}
        while True:
            page = self.store.client.scan(**kwargs)
            for item in page.get("Items", []):
                items[item["id"]["S"]] = item
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def indexed(self, status: str) -> set[str]:
        """The ids the status index lists under ``status``."""
        found: set[str] = set()
        kwargs: dict[str, Any] = {
            "TableName": self.store.table,
            "IndexName": self.store.index,
            "KeyConditionExpression": "#s = :s",
            "ExpressionAttributeNames": {"#s": "status"},
            "ExpressionAttributeValues": {":s": {"S": status}},
        }
        while True:
            page = self.store.client.query(**kwargs)
            found.update(i["id"]["S"] for i in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return found
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # -- rules ----------------------------------------------------------------

    @rule(actor=st.integers(0, ACTORS - 1), count=st.integers(1, 3))
    def emit(self, actor: int, count: int) -> None:
        """An actor publishes a few events, due now."""
        # Ids from a counter, not uuids, so a failing example replays the
        # same way (events due at the same time come back in id order).
        first = len(self.emitted)
        events = [
            Event.new("order.created", {"n": n}, id=f"event-{n:03d}")
            for n in range(first, first + count)
        ]
        self.actors[actor].publish(events)
        self.emitted.extend(e.id for e in events)

    @rule(target=leases, actor=st.integers(0, ACTORS - 1), limit=st.integers(1, 4))
    def claim(self, actor: int, limit: int) -> Any:
        """An actor claims due events; none of them may hold a live lease."""
        now = self.clock()
        before = self.before()
        result = self.actors[actor].claim(limit)
        after = self.scan()
        # One actor at a time and a consistent index: no race is ever lost.
        assert result.skipped == 0
        for lease in result.leases:
            event_id = lease.event.id
            old = before[event_id]
            held = self.live.get(event_id)
            assert held is None or held.deadline_ms <= now, (
                f"{event_id} leased again while lease {held.token} runs to "
                f"{held.deadline_ms} (now {now})"
            )
            assert _sort_key(old) <= now
            assert _status(old) in (Status.CREATED.value, Status.ACTIVE.value)
            # A reclaim counts the lost attempt if its handler had started.
            reclaim = _status(old) == Status.ACTIVE.value
            lost = 1 if reclaim and "runningSince" in old else 0
            if reclaim:
                seen(
                    "reclaimed a started attempt"
                    if lost
                    else "reclaimed a lease that never started"
                )
            else:
                seen("claimed")
            assert lease.event.attempt == _retries(old) + lost + 1
            assert "runningSince" not in after[lease.event.id]
            # A lease that never started is sent again under its token.
            assert (lease.token == _token(old)) == (reclaim and not lost)
            assert lease.deadline_ms == now + TIMEOUT_MS
            new = after[event_id]
            assert _status(new) == Status.ACTIVE.value
            assert _token(new) == lease.token
            assert _sort_key(new) == lease.deadline_ms
            # The lease's event is of the round the table is in.
            assert lease.event.operator_retries == self.rounds.get(event_id, 0)
            assert _rounds(new) == _rounds(old) == self.rounds.get(event_id, 0)
            self.live[event_id] = lease
        exhausted = [
            i
            for i, item in before.items()
            if _status(item) == Status.ACTIVE.value
            and _status(after.get(i)) == Status.FAILED.value
        ]
        assert len(exhausted) == result.exhausted
        for event_id in exhausted:
            seen("an expired lease used the last retry")
            assert "runningSince" in before[event_id], "a never-started attempt counted"
            assert _retries(after[event_id]) > self.config.max_retries
            self.live.pop(event_id, None)
        if len(result.leases) + result.exhausted < limit:
            # Nothing due may be left behind by a claim that had room for it.
            left = [
                i
                for i, item in after.items()
                if _status(item) in (Status.CREATED.value, Status.ACTIVE.value)
                and _sort_key(item) <= now
                and i not in {x.event.id for x in result.leases}
            ]
            assert not left, f"claim left due events behind: {left}"
        return multiple(*result.leases)

    def _write_back(self, what: str, lease: Lease, write: Any) -> tuple[Outcome, bool]:
        """Run ``write``; a stale lease must change nothing and say so."""
        before = self.before().get(lease.event.id)
        live = _status(before) == Status.ACTIVE.value and _token(before) == lease.token
        outcome = write()
        after = self.store.get_item(lease.event.id)
        seen(f"{'live' if live else 'stale'} {what}")
        seen("a live write-back" if live else "a stale write-back")
        if not live:
            assert outcome is Outcome.STALE
            assert after == before, "a stale lease changed the item"
        else:
            assert outcome is not Outcome.STALE
            assert self.live.pop(lease.event.id).token == lease.token
        return outcome, live

    @rule(actor=st.integers(0, ACTORS - 1), lease=leases)
    def begin(self, actor: int, lease: Lease) -> None:
        """A handler starts under a lease it holds or once held.

        Only the first start of an attempt goes through: a second copy of
        its message (a lease sent again before it started) must not run.
        """
        before = self.before().get(lease.event.id)
        live = (
            _status(before) == Status.ACTIVE.value
            and _token(before) == lease.token
            and "runningSince" not in before
        )
        renewed = self.actors[actor].begin(lease)
        after = self.store.get_item(lease.event.id)
        seen("a live begin" if live else "a stale begin")
        if not live:
            assert renewed is None
            assert after == before, "a stale lease changed the item"
            return
        assert renewed is not None and after is not None
        assert renewed.token == lease.token
        assert renewed.deadline_ms == self.clock() + TIMEOUT_MS
        assert _sort_key(after) == renewed.deadline_ms
        assert int(after["runningSince"]["N"]) == self.clock()
        self.live[lease.event.id] = renewed

    @rule(
        kind=st.sampled_from(["complete", "fail", "release"]),
        actor=st.integers(0, ACTORS - 1),
        lease=leases,
        final=st.booleans(),
        delay_ms=st.none() | st.integers(0, 300),
    )
    def write_back(
        self, kind: str, actor: int, lease: Lease, final: bool, delay_ms: int | None
    ) -> None:
        """An actor writes back under a lease it holds or once held."""
        if kind == "complete":
            self.complete(actor, lease)
        elif kind == "fail":
            self.fail(actor, lease, final, delay_ms)
        else:
            self.release(actor, lease)

    def complete(self, actor: int, lease: Lease) -> None:
        """An actor reports success under a lease, live or stale."""
        outcome, live = self._write_back(
            "complete", lease, lambda: self.actors[actor].complete(lease)
        )
        if live:
            assert outcome is Outcome.COMPLETED
            self.completed.add(lease.event.id)

    def fail(self, actor: int, lease: Lease, final: bool, delay_ms: int | None) -> None:
        """An actor reports failure under a lease, live or stale."""
        store = self.actors[actor]
        outcome, live = self._write_back(
            "fail",
            lease,
            lambda: store.fail(lease, "boom", delay_ms=delay_ms, final=final),
        )
        if not live:
            return
        item = self.store.get_item(lease.event.id)
        assert item is not None
        assert _retries(item) == lease.retry_count + 1
        if final or lease.retry_count + 1 > self.config.max_retries:
            assert outcome is Outcome.FAILED
            assert _status(item) == Status.FAILED.value
            assert _sort_key(item) == self.clock()
        else:
            assert outcome is Outcome.RETRYING
            assert _status(item) == Status.CREATED.value
            assert _sort_key(item) > self.clock() or delay_ms == 0

    def release(self, actor: int, lease: Lease) -> None:
        """An actor gives a lease back unused, live or stale."""
        outcome, live = self._write_back(
            "release", lease, lambda: self.actors[actor].release(lease)
        )
        if live:
            assert outcome is Outcome.RETRYING
            item = self.store.get_item(lease.event.id)
            assert item is not None
            assert _status(item) == Status.CREATED.value
            assert _retries(item) == lease.retry_count

    @rule(ms=st.sampled_from([1, TIMEOUT_MS // 2, TIMEOUT_MS - 1]))
    def tick(self, ms: int) -> None:
        """A little time passes: leases taken just now are still live."""
        self.clock.now += ms

    @rule(ms=st.sampled_from([TIMEOUT_MS, TIMEOUT_MS + 1, 5 * TIMEOUT_MS]))
    def expire(self, ms: int) -> None:
        """A lease's worth of time passes: leases expire and backoffs end."""
        self.clock.now += ms

    @precondition(lambda self: bool(self.emitted))
    @rule(actor=st.integers(0, ACTORS - 1), data=st.data())
    def operator_retry(self, actor: int, data: st.DataObject) -> None:
        """An operator retries some events; only failed ones move."""
        before = self.before()
        ids = data.draw(st.lists(st.sampled_from(self.emitted), max_size=3))
        failed = sorted(i for i, it in before.items() if _status(it) == "failed")
        if failed:
            # Operators retry failed events, mostly.
            ids.insert(0, data.draw(st.sampled_from(failed)))
        report = self.actors[actor].retry(ids)
        after = self.scan()
        unique = list(dict.fromkeys(ids))
        if report.retried:
            seen("an operator retried a failed event")
        assert report.retried == [
            i for i in unique if _status(before.get(i)) == Status.FAILED.value
        ]
        assert report.missing == [i for i in unique if i not in before]
        assert report.not_failed == [
            i
            for i in unique
            if i in before and _status(before[i]) != Status.FAILED.value
        ]
        for event_id in unique:
            if event_id in report.retried:
                assert _status(after[event_id]) == Status.CREATED.value
                assert _retries(after[event_id]) == 0
                self.rounds[event_id] = self.rounds.get(event_id, 0) + 1
                assert _rounds(after[event_id]) == self.rounds[event_id]
            else:
                assert after.get(event_id) == before.get(event_id)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def check_table(self) -> None:
        """Read the whole table and check every invariant against the model."""
        if self.reader is None:
            return
        self.snapshot = None
        items = self.scan()
        self.every_event_is_findable(items)
        self.table_holds_the_latest_lease(items)
        self.snapshot = items

    def every_event_is_findable(self, items: dict[str, dict[str, Any]]) -> None:
        """Until completion an event is created, leased or failed, and indexed."""
        for event_id in self.emitted:
            item = items.get(event_id)
            if event_id in self.completed:
                if self.config.completion is Completion.DELETE:
                    assert item is None
                else:
                    assert _status(item) == Status.COMPLETED.value
                    assert _token(item) is None
                continue
            assert item is not None, f"event {event_id} was lost"
            assert _status(item) in PENDING
            sort_key = _sort_key(item)  # present and numeric: indexed
            if _status(item) == Status.ACTIVE.value:
                began = item.get("runningSince", item["startedOn"])
                assert sort_key == int(began["N"]) + TIMEOUT_MS
            else:
                assert _token(item) is None
            if _status(item) != Status.FAILED.value:
                assert _retries(item) <= self.config.max_retries

    def table_holds_the_latest_lease(self, items: dict[str, dict[str, Any]]) -> None:
        """The token in the table is the one of the latest live grant."""
        active = {
            i: _token(item)
            for i, item in items.items()
            if _status(item) == Status.ACTIVE.value
        }
        assert active == {i: lease.token for i, lease in self.live.items()}


def run_machine(endpoint: str, **options: Any) -> None:
    """Run :class:`LeaseMachine` against ``endpoint`` with ``options``."""
    machine = type("Machine", (LeaseMachine,), {"endpoint": endpoint})
    run_state_machine_as_test(
        machine,
        settings=settings(
            deadline=None,
            # A fixed sequence of examples: the run must reach every kind of
            # race (COVERED) on every machine, not only on lucky draws.
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
            **options,
        ),
    )


COVERED = {
    "claimed",
    "reclaimed a started attempt",
    "reclaimed a lease that never started",
    "a live begin",
    "a stale begin",
    "an expired lease used the last retry",
    "an operator retried a failed event",
    "a live write-back",
    "a stale write-back",
}


def test_lease_invariants_on_moto(moto_endpoint: str) -> None:
    """Random interleavings of several actors keep every lease invariant (moto)."""
    SEEN.clear()
    run_machine(
        moto_endpoint,
        max_examples=int(os.environ.get("OUTBOX_PROPERTY_EXAMPLES", "60")),
        stateful_step_count=30,
    )
    # The run means something only if it reached every kind of race.
    missing = COVERED - set(SEEN)
    assert not missing, f"never exercised: {missing} (seen: {dict(SEEN)})"


@pytest.mark.integration
def test_lease_invariants_on_dynamodb_local(ddb_local_endpoint: str) -> None:
    """A smaller run of the same interleavings against DynamoDB Local."""
    run_machine(ddb_local_endpoint, max_examples=12, stateful_step_count=25)
