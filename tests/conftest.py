"""Shared fixtures: DynamoDB backends, the Redis broker, fresh tables.

Store tests take the ``store`` fixture, which runs each test twice: against
moto's server and against DynamoDB Local. On a laptop without Java or Redis
the tests that need them are skipped; under CI (``CI=true``) a missing
service is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_outbox import OutboxConfig, OutboxStore
from celery_outbox.testing import DynamoDBLocal, MotoServer, fake_credentials

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("OUTBOX_TEST_REDIS", "redis://127.0.0.1:6379")

fake_credentials()


def unavailable(reason: str) -> None:
    """Skip on a laptop, fail under CI: CI must run every test."""
    if IN_CI:
        pytest.fail(f"required service unavailable under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's DynamoDB server, shared by the session."""
    with MotoServer() as server:
        yield server.endpoint_url


@pytest.fixture(scope="session")
def ddb_local_endpoint() -> Iterator[str]:
    """DynamoDB Local, shared by the session (or OUTBOX_TEST_DYNAMODB)."""
    given = os.environ.get("OUTBOX_TEST_DYNAMODB")
    if given:
        yield given
        return
    try:
        local = DynamoDBLocal().start()
    except (RuntimeError, OSError) as exc:
        unavailable(f"DynamoDB Local: {exc}")
        return
    try:
        yield local.endpoint_url
    finally:
        local.stop()


@pytest.fixture(
    params=["moto", pytest.param("dynamodb-local", marks=pytest.mark.integration)]
)
def endpoint(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: every store test runs on both."""
    name = "moto_endpoint" if request.param == "moto" else "ddb_local_endpoint"
    return str(request.getfixturevalue(name))


def make_store(endpoint_url: str, **options: Any) -> OutboxStore:
    """A store on a fresh, uniquely named table."""
    config = OutboxConfig(
        table_name=f"test-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint_url, **options
    )
    store = OutboxStore(config)
    store.create_table()
    return store


@pytest.fixture
def store(endpoint: str) -> Iterator[OutboxStore]:
    """A store with a fresh table on each backend, deleted afterwards."""
    made = make_store(endpoint)
    yield made
    made.delete_table()


@pytest.fixture
def store_factory(endpoint: str) -> Iterator[Any]:
    """Make stores with options on the current backend; tables are cleaned up."""
    made: list[OutboxStore] = []

    def factory(**options: Any) -> OutboxStore:
        store = make_store(endpoint, **options)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.delete_table()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis broker, on a database of its own for this run."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:
        unavailable(f"Redis at {REDIS_URL}: {exc}")
    db = int(os.environ.get("OUTBOX_TEST_REDIS_DB", "11"))
    return f"{REDIS_URL}/{db}"


@pytest.fixture
def queue_name() -> str:
    """A queue no other test or concurrent run consumes from."""
    return f"outbox-test-{uuid.uuid4().hex[:8]}"
