"""A first end-to-end pass through the store on both backends."""

from celery_outbox import Event, OutboxStore, Outcome, Status


def test_emit_claim_complete(store: OutboxStore) -> None:
    """An emitted event is claimed once and completing it deletes it."""
    event = Event.new("order.created", {"total": 30.4})
    store.publish([event])
    result = store.claim()
    assert [lease.event.id for lease in result.leases] == [event.id]
    assert result.leases[0].event.payload == {"total": 30.4}
    assert store.status_of(event.id) is Status.ACTIVE
    assert store.complete(result.leases[0]) is Outcome.COMPLETED
    assert store.status_of(event.id) is None
