"""The outbox: emit events, register handlers, and drain into Celery.

::

    app = Celery("shop", broker="redis://127.0.0.1:6379/0")
    app.conf.outbox_table_name = "shop-outbox"
    outbox = Outbox(app)

    @outbox.handler("order.created")
    def send_confirmation(event):
        ...

    with outbox.transaction() as tx:
        tx.put("orders", {"id": "o-1", "total": 30.4})
        outbox.emit("order.created", {"order_id": "o-1"})

``Outbox(app)`` registers the ``outbox_*`` settings' defaults, the
``celery_outbox.drain`` task and its beat entry (unless the app's
``beat_schedule`` already runs that task), and the start-up checks that run
when a worker starts (:mod:`celery_outbox.checks`). Without an app it is a
producer only: emit and inspect, no handlers.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery_outbox import collector as collectors
from celery_outbox import settings
from celery_outbox.config import OutboxConfig
from celery_outbox.errors import ConfigError, EventError, HandlerError
from celery_outbox.event import Event
from celery_outbox.store import Clock, OutboxStore, make_client

if TYPE_CHECKING:
    from celery_outbox.batch import InsertReport
    from celery_outbox.nudge import Nudger
    from celery_outbox.writeback import Writer

__all__ = ["Outbox"]

# The transaction open in this context, so that a nested one joins it.
_open_transaction: contextvars.ContextVar[collectors.Transaction | None] = (
    contextvars.ContextVar("celery_outbox_transaction", default=None)
)

DRAIN_TASK = "celery_outbox.drain"

_INSTALLED: weakref.WeakKeyDictionary[Any, Outbox] = weakref.WeakKeyDictionary()


class Outbox:
    """One outbox table, installed into a Celery app (or producer-only).

    Args:
        app: the Celery app to install into; None for a producer-only
            outbox (emits and inspection, no tasks).
        config: explicit settings; by default they are read from
            ``app.conf`` (``outbox_*``), or the defaults without an app.
        client: a boto3 DynamoDB client to use instead of making one.
        clock: milliseconds since the epoch (tests and drills).
        **options: outbox options that override the app's settings.
    """

    def __init__(
        self,
        app: Any = None,
        *,
        config: OutboxConfig | None = None,
        client: Any = None,
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        if app is not None:
            # Celery keeps the first task registered under a name, so a second
            # outbox's drain would never run and its handlers never be found.
            if app in _INSTALLED:
                raise ConfigError(
                    "app",
                    f"the Celery app {app.main!r} already has an Outbox; import "
                    "that one instead of making a second one on the same app",
                )
            settings.install(app)
        self._config = config
        self._options = options
        if config is not None and options:
            self._config = config.replace(**options)
        self._client = client
        self._clock = clock
        # Stores by kind ("usual", "prompt"), each with the pid it was made in.
        self._stores: dict[str, tuple[int, OutboxStore]] = {}
        self._lock = threading.Lock()
        self.handlers: dict[str, Any] = {}
        self.drain_task: Any = None
        self.receivers: list[Callable[..., Any]] = []
        self.drain_lock = threading.Lock()
        self.drain_errors = 0
        self.drain_paused_until = 0.0  # time.monotonic() seconds
        self._writer: Writer | None = None
        self._nudger: Nudger | None = None
        if app is not None:
            from celery_outbox import nudge, tasks

            tasks.install(self)
            nudge.install(self)
            _INSTALLED[app] = self

    def __repr__(self) -> str:
        table = self.config.table_name
        return f"<Outbox table={table!r} handlers={sorted(self.handlers)}>"

    # -- configuration and store -------------------------------------------

    @property
    def config(self) -> OutboxConfig:
        """The validated settings (read from the app once, when first used)."""
        if self._config is None:
            if self.app is None:
                self._config = OutboxConfig(**self._options)
            else:
                self._config = settings.config_from_app(self.app, **self._options)
        return self._config

    @property
    def store(self) -> OutboxStore:
        """The DynamoDB store, made once per process.

        boto3 clients must not cross a ``fork``; a prefork worker child gets
        its own on first use.
        """
        return self._own_store("usual")

    @property
    def prompt_store(self) -> OutboxStore:
        """A store whose requests give up within seconds, made once per process.

        For writes made where waiting out a DynamoDB outage would stall more
        than one task: the worker's main process reports a lost child
        through it (:class:`~celery_outbox.handlers.HandlerRequest`). A write
        it gives up on is left to the lease's expiry. An outbox given a
        ``client`` uses that client here too.
        """
        return self._own_store("prompt")

    def _own_store(self, kind: str) -> OutboxStore:
        """This process's store of ``kind``, made on its first use here.

        The client the outbox was given serves the first process to use the
        kind; any other process (a forked child) makes a client of its own.
        """
        pid = os.getpid()
        made = self._stores.get(kind)
        if made is not None and made[0] == pid:
            return made[1]
        with self._lock:
            made = self._stores.get(kind)
            if made is not None and made[0] == pid:
                return made[1]
            client = self._client if made is None else None
            if client is None and kind == "prompt":
                client = make_client(self.config, prompt=True)
            store = OutboxStore(self.config, client=client, clock=self._clock)
            self._stores[kind] = (pid, store)
            return store

    @property
    def writer(self) -> Writer:
        """How this process claims and writes back, by ``write_mode``.

        Made once per process, with the store (:mod:`celery_outbox.writeback`).
        """
        store = self.store
        writer = self._writer
        if writer is None or writer.store is not store:
            from celery_outbox.writeback import make_writer

            with self._lock:
                writer = self._writer = make_writer(store)
        return writer

    def nudge(self, events: Sequence[Event] = ()) -> None:
        """Ask for a drain now (debounced, safe to lose), whatever ``nudge`` says.

        Emits nudge by themselves when ``nudge`` is on; call this after
        committing a collector of your own, with the events it held.
        """
        if self.app is None:
            return  # a producer-only outbox has no drain task to send
        if self._nudger is None:
            from celery_outbox.nudge import Nudger

            self._nudger = Nudger(self)
        self._nudger.poke(events)

    def _committed(self, events: Sequence[Event]) -> None:
        if self.config.nudge:
            self.nudge(events)

    # -- emit ----------------------------------------------------------------

    def emit(
        self,
        type: str,
        payload: Any = None,
        *,
        id: str | None = None,
        occurred_at: datetime | str | None = None,
        collector: list[dict[str, Any]] | None = None,
    ) -> Event:
        """Emit one event: write it now, or append it to a collector.

        The collector is ``collector`` when given, else the one bound by
        :meth:`collecting` or :meth:`transaction`, else the event is written
        at once. Returns the event (with its generated id).

        Raises:
            EventError: the type, id, time or payload is invalid.
            CollectorError: the collector cannot take the event.
            EventExistsError: the id is already stored (direct writes).
        """
        event = Event.new(type, payload, id=id, occurred_at=occurred_at)
        self.publish([event], collector=collector)
        return event

    def publish(
        self,
        events: Sequence[Event],
        *,
        collector: list[dict[str, Any]] | None = None,
    ) -> None:
        """Emit several events at once, all or none (at most 100).

        Build them with :meth:`Event.new`. Without a collector they are
        written in one request; with one they are appended to it.
        """
        if isinstance(events, Event) or not isinstance(events, Iterable):
            raise EventError(
                f"publish takes a list of Event objects, got {type(events).__name__}"
                "; emit writes a single event"
            )
        events = _events("publish", events)
        target = collector if collector is not None else collectors.current()
        if target is None:
            self.store.publish(events)
            self._committed(events)
            return
        actions = [self.store.put_action(e) for e in events]
        collectors.append(target, actions)

    @contextlib.contextmanager
    def collecting(
        self, collector: list[dict[str, Any]] | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Bind a collector: emits in this block append to it (see collector)."""
        with collectors.collecting(collector) as bound:
            yield bound

    @contextlib.contextmanager
    def transaction(self) -> Iterator[collectors.Transaction]:
        """Collect business actions and events; commit them as one transaction.

        The commit happens when the block exits normally; an exception
        inside the block writes nothing. A transaction opened inside another
        (by a helper function, say) joins it: nothing is written until the
        outermost block exits, and an exception leaving the inner block takes
        back only what the inner block added.

        Raises:
            EventExistsError: an emitted id already exists; nothing written.
            StoreError: DynamoDB cancelled the transaction (a condition of
                one of the caller's actions, say); nothing written.
        """
        outer = _open_transaction.get()
        if outer is not None:
            mark = len(outer.actions)
            try:
                yield outer
            except BaseException:
                del outer.actions[mark:]
                raise
            return
        tx = collectors.Transaction()
        token = _open_transaction.set(tx)
        try:
            with collectors.collecting(tx.actions):
                yield tx
        finally:
            _open_transaction.reset(token)
        self.store.commit(tx.actions)
        if self.config.nudge:
            self._committed(self._events_in(tx.actions))

    def publish_each(self, events: Sequence[Event]) -> InsertReport:
        """Write many events, each on its own: not all-or-none, and faster.

        With ``write_mode = "partiql"`` they go 25 to a request as
        ``INSERT`` statements; otherwise one conditional put each. A stored
        id is never overwritten: it is listed in the report's ``existing``.
        Use :meth:`publish` when the events must be written together.
        """
        events = _events("publish_each", events)
        report = self.writer.insert(events)
        if report.written:
            written = set(report.written)
            self._committed([e for e in events if e.id in written])
        return report

    def _events_in(self, actions: Sequence[dict[str, Any]]) -> list[Event]:
        """The outbox events a transaction's actions create."""
        table = self.config.table_name
        return [
            Event.from_item(put["Item"])
            for put in (a.get("Put") for a in actions)
            if put and put.get("TableName") == table and "status" in put["Item"]
        ]

    # -- handlers ------------------------------------------------------------

    def handler(
        self, event_type: str, **options: Any
    ) -> Callable[[Callable[..., Any]], Any]:
        """Register the decorated function as the Celery task for ``event_type``.

        ``options`` are Celery task options (``bind``, ``queue``,
        ``time_limit``, ``autoretry_for``, ``base``...) with their usual
        meaning; see :mod:`celery_outbox.handlers` for how Celery's retries
        become the outbox's. The function receives an :class:`Event` (after
        ``self`` with ``bind=True``) with its ``attempt`` number. The task's
        name defaults to Celery's usual name for the function.

        Raises:
            HandlerError: a producer-only outbox, a type that already has a
                handler, or an option that contradicts the outbox.
        """
        if self.app is None:
            raise HandlerError(
                "a producer-only outbox has no handlers; pass a Celery app"
            )
        if not isinstance(event_type, str):
            raise HandlerError(
                "outbox.handler takes the event type first, as in "
                f"@outbox.handler('order.created'); got {event_type!r}"
            )
        Event.new(event_type)  # validates the type the way emits do
        if event_type in self.handlers:
            raise HandlerError(
                f"event type {event_type!r} already has the handler "
                f"{self.handlers[event_type].name!r}"
            )
        from celery_outbox import tasks

        def decorate(fn: Callable[..., Any]) -> Any:
            task = tasks.register_handler(self, event_type, fn, options)
            for other_type, other in self.handlers.items():
                if other.name == task.name:
                    raise HandlerError(
                        f"the handlers of {other_type!r} and {event_type!r} would "
                        f"both be the task {task.name!r}; give one a name= option"
                    )
            self.handlers[event_type] = task
            return task

        return decorate

    def drain(self) -> dict[str, int]:
        """Claim due events and dispatch one handler task each (the beat task)."""
        from celery_outbox import tasks

        return tasks.drain(self)


def _events(method: str, events: Iterable[Any]) -> list[Event]:
    """``events`` as a list, or EventError naming the first that is no Event."""
    listed = list(events)
    for event in listed:
        if not isinstance(event, Event):
            raise EventError(
                f"{method} takes Event objects (see Event.new), got "
                f"{type(event).__name__}"
            )
    return listed
