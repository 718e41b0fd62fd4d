"""The PartiQL batch runner, the write-mode options and the item writer."""

from __future__ import annotations

import random
from typing import Any

import pytest

from celery_outbox import ConfigError, Event, OutboxConfig, OutboxStore, StoreError
from celery_outbox.config import WriteMode
from celery_outbox.partiql import EXISTS, LOST, OK, Statement, execute, quote
from celery_outbox.shards import StatusKeys, shard_of
from celery_outbox.store import Status
from celery_outbox.writeback import BatchWriter, ItemWriter, make_writer


class FakeClient:
    """Answers each statement by the code its parameter names."""

    def __init__(self, throttle_once: set[str] | None = None) -> None:
        self.batches: list[list[str]] = []
        self.throttle_once = set(throttle_once or ())

    def batch_execute_statement(self, Statements: list[dict[str, Any]]) -> Any:
        keys = [s["Parameters"][0]["S"] for s in Statements]
        self.batches.append(keys)
        responses = []
        for key in keys:
            if key in self.throttle_once:
                self.throttle_once.discard(key)
                responses.append({"Error": {"Code": "ThrottlingError"}})
            elif key.startswith("lost"):
                responses.append({"Error": {"Code": "ConditionalCheckFailed"}})
            elif key.startswith("dup"):
                responses.append({"Error": {"Code": "DuplicateItem"}})
            elif key.startswith("bad"):
                error = {"Code": "ValidationError", "Message": "no"}
                responses.append({"Error": error})
            else:
                responses.append({})
        return {"Responses": responses}


def stmt(key: str) -> Statement:
    """A statement about item ``key``."""
    return Statement('DELETE FROM "t" WHERE "id" = ?', ({"S": key},), key)


class TestExecute:
    """partiql.execute: batching, answers and resends."""

    def test_each_statement_gets_its_own_answer(self) -> None:
        """Successes, failed conditions and existing keys come back in order."""
        client = FakeClient()
        results = execute(client, [stmt("a"), stmt("lost-1"), stmt("dup-1")], table="t")
        assert results == [OK, LOST, EXISTS]

    def test_batches_hold_at_most_25(self) -> None:
        """Sixty statements go out as 25, 25 and 10, in parallel."""
        client = FakeClient()
        execute(client, [stmt(f"k{i}") for i in range(60)], table="t")
        assert sorted(len(b) for b in client.batches) == [10, 25, 25]

    def test_one_item_is_never_twice_in_a_batch(self) -> None:
        """A second statement on the same item waits for the next round."""
        client = FakeClient()
        statements = [stmt("a"), *(stmt(f"k{i}") for i in range(30)), stmt("a")]
        results = execute(client, statements, table="t")
        assert results == [OK] * 32
        assert sorted(len(b) for b in client.batches) == [1, 6, 25]
        assert client.batches[-1] == ["a"]

    def test_throttled_statements_are_resent(self) -> None:
        """Only the throttled statements go out again."""
        client = FakeClient(throttle_once={"b"})
        results = execute(
            client, [stmt("a"), stmt("b")], table="t", rng=random.Random(1)
        )
        assert results == [OK, OK]
        assert client.batches == [["a", "b"], ["b"]]

    def test_other_errors_raise(self) -> None:
        """A statement DynamoDB refuses outright raises StoreError with its code."""
        with pytest.raises(StoreError) as info:
            execute(FakeClient(), [stmt("a"), stmt("bad-1")], table="t")
        assert info.value.code == "ValidationError"
        assert "bad-1" in str(info.value)

    def test_names_are_quoted(self) -> None:
        """Identifiers are double-quoted; a quote inside one is refused."""
        assert quote("status") == '"status"'
        with pytest.raises(ValueError):
            quote('a"b')


class TestOptions:
    """The performance options of OutboxConfig."""

    def test_defaults_keep_the_item_path_and_layout(self) -> None:
        """By default writes go item by item, unsharded, without nudges."""
        config = OutboxConfig()
        assert config.write_mode is WriteMode.ITEM
        assert config.shards == 1 and config.nudge is False

    def test_write_mode_from_a_string(self) -> None:
        """A setting given as a string becomes the enum."""
        assert OutboxConfig(write_mode="partiql").write_mode is WriteMode.PARTIQL

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("write_mode", "fast"),
            ("shards", 0),
            ("shards", 65),
            ("shards", True),
            ("nudge", "yes"),
            ("flush_interval_ms", 0),
            ("busy_poll_interval_ms", -1),
        ],
    )
    def test_bad_values_name_the_option(self, option: str, value: Any) -> None:
        """An invalid value is refused with the option's name."""
        with pytest.raises(ConfigError) as info:
            OutboxConfig(**{option: value})
        assert info.value.option == option

    def test_make_writer_follows_the_mode(self) -> None:
        """The write mode alone picks the writer; no error is caught to choose."""
        item = OutboxStore(OutboxConfig(), client=object())
        batch = OutboxStore(OutboxConfig(write_mode="partiql"), client=object())
        assert isinstance(make_writer(item), ItemWriter)
        assert isinstance(make_writer(batch), BatchWriter)


class TestStatusKeys:
    """Sharded status values."""

    def test_one_shard_is_the_plain_layout(self) -> None:
        """With one shard the status values are the TypeScript adapter's."""
        keys = StatusKeys(1)
        assert keys.value(Status.CREATED, "e1") == "created"
        assert keys.partitions(Status.ACTIVE) == ["active"]

    def test_shards_spread_created_and_active_only(self) -> None:
        """created and active get the id's shard; failed stays plain."""
        keys = StatusKeys(4)
        k = shard_of("e1", 4)
        assert keys.value(Status.CREATED, "e1") == f"created#{k}"
        assert keys.value(Status.ACTIVE, "e1") == f"active#{k}"
        assert keys.value(Status.FAILED, "e1") == "failed"
        assert keys.partitions(Status.CREATED, 2) == [
            "created#2",
            "created#3",
            "created#0",
            "created#1",
        ]
        assert StatusKeys.status("active#3") is Status.ACTIVE

    def test_shard_of_is_stable_and_spread(self) -> None:
        """The shard depends only on the id, and ids spread over every shard."""
        ids = [f"event-{i}" for i in range(400)]
        assert [shard_of(i, 8) for i in ids] == [shard_of(i, 8) for i in ids]
        assert {shard_of(i, 8) for i in ids} == set(range(8))


def test_item_writer_insert_never_overwrites(store: OutboxStore) -> None:
    """The item writer inserts with conditional puts on both backends."""
    (old,) = [Event.new("order.created", {"n": 0})]
    store.publish([old])
    writer = ItemWriter(store)
    clash = Event.new("order.created", {"other": True}, id=old.id)
    new = Event.new("order.created", {"n": 1})
    report = writer.insert([clash, new])
    assert report.existing == [old.id] and report.written == [new.id]
    item = store.get_item(old.id)
    assert item is not None and Event.from_item(item).payload == {"n": 0}


def test_item_writer_insert_checks_every_event_first(store: OutboxStore) -> None:
    """An event too large for DynamoDB stops the insert before any write."""
    from celery_outbox import ItemTooLargeError

    good = Event.new("order.created", {"n": 1})
    huge = Event.new("order.created", {"blob": "x" * 500_000})
    with pytest.raises(ItemTooLargeError):
        ItemWriter(store).insert([good, huge])
    assert store.get_item(good.id) is None


class RacingBatches:
    """A batch writer whose start marks all miss, as when a failure raced them."""

    def __init__(self) -> None:
        self.buffer: Any = None
        self.race = True

    def write_back(self, starts: list[Any], completions: list[Any]) -> Any:
        if self.race:
            for lease in starts:  # the handler's failure is written meanwhile
                self.buffer.discard(lease)
        return [False] * len(starts), list(starts), []


def test_a_start_mark_that_lost_to_its_own_failure_is_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a start that missed for another reason warns that it may run twice."""
    from celery_outbox.event import Lease
    from celery_outbox.writeback import WriteBuffer

    batches = RacingBatches()
    buffer = WriteBuffer(batches, 60_000)  # type: ignore[arg-type]
    batches.buffer = buffer
    lease = Lease(Event.new("order.created"), "t1", 0, 0)
    buffer.start(lease)
    with caplog.at_level("WARNING", logger="celery_outbox.writeback"):
        buffer.flush()
    assert "may run twice" not in caplog.text
    batches.race = False
    buffer.start(lease)
    with caplog.at_level("WARNING", logger="celery_outbox.writeback"):
        buffer.flush()
    assert "may run twice" in caplog.text


class RefusingBatches:
    """A batch writer DynamoDB refuses; the handler's failure lands as the
    flusher reads the clock to sort out what to queue again."""

    def __init__(self) -> None:
        self.buffer: Any = None
        self.store = self
        self.failed: list[Any] = []

    def clock(self) -> int:
        for lease in self.failed:  # HandlerTask._fail, in the handler's thread
            self.buffer.discard(lease)
        return 0

    def write_back(self, starts: list[Any], completions: list[Any]) -> Any:
        self.failed = list(starts)
        raise StoreError("refused", "InternalServerError")


def test_a_refused_start_whose_failure_was_written_meanwhile_is_not_queued_again() -> (
    None
):
    """A discard racing a refused flush settles the start: it is not resent."""
    from celery_outbox.event import Lease
    from celery_outbox.writeback import WriteBuffer

    batches = RefusingBatches()
    buffer = WriteBuffer(batches, 60_000)  # type: ignore[arg-type]
    batches.buffer = buffer
    lease = Lease(Event.new("order.created"), "t1", 60_000, 0)
    buffer.start(lease)
    buffer.flush()
    assert buffer.take(25) == ([], [])


class RecordingBatches:
    """A batch writer that writes everything it is given."""

    def __init__(self) -> None:
        self.written: list[tuple[list[Any], list[Any]]] = []

    def write_back(self, starts: list[Any], completions: list[Any]) -> Any:
        self.written.append((list(starts), list(completions)))
        return [True] * len(starts), [], []


def test_a_deferred_copy_does_not_replace_its_lease_s_waiting_completion() -> None:
    """A second copy of a completed lease neither runs nor drops the completion."""
    import dataclasses

    from celery_outbox.event import Lease
    from celery_outbox.writeback import WriteBuffer

    batches = RecordingBatches()
    writer = BatchWriter.__new__(BatchWriter)
    writer.buffer = WriteBuffer(batches, 60_000)  # type: ignore[arg-type]
    lease = Lease(Event.new("order.created"), "t1", 60_000, 0)
    first = dataclasses.replace(lease, copy="first")
    second = dataclasses.replace(lease, copy="second")
    assert writer.begin(first, defer=True) is first
    writer.complete(first)
    assert writer.begin(second, defer=True) is None
    writer.flush()
    assert batches.written == [([], [first])]


class OvertakingBatches:
    """A batch writer whose start marks are overtaken by their completions:
    the handler finishes while its mark is in flight, and the next task's
    start carries the completion, which lands first."""

    def __init__(self) -> None:
        self.buffer: Any = None

    def write_back(self, starts: list[Any], completions: list[Any]) -> Any:
        for lease in starts:
            self.buffer.complete(lease)  # on_success, in the handler's thread
        assert self.buffer.take(24) == ([], starts)  # BatchWriter.begin
        return [False] * len(starts), list(starts), []


def test_a_start_mark_overtaken_by_its_completion_is_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A start that missed because its own completion landed first is moot."""
    from celery_outbox.event import Lease
    from celery_outbox.writeback import WriteBuffer

    batches = OvertakingBatches()
    buffer = WriteBuffer(batches, 60_000)  # type: ignore[arg-type]
    batches.buffer = buffer
    buffer.start(Lease(Event.new("order.created"), "t1", 60_000, 0))
    with caplog.at_level("WARNING", logger="celery_outbox.writeback"):
        buffer.flush()
    assert "may run twice" not in caplog.text
