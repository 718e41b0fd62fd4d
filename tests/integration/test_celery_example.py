"""The example shop in ``examples/`` runs as its README says."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_outbox import Completion, Outbox, OutboxConfig
from tests.celery_support import ROOT, stop_process_group, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "examples"


@pytest.fixture
def shop_env(
    ddb_local_endpoint: str, redis_url: str, queue_name: str
) -> Iterator[dict[str, str]]:
    """The shop's environment: its own queue and tables."""
    suffix = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)]),
        "SHOP_BROKER_URL": redis_url,
        "SHOP_DYNAMODB_URL": ddb_local_endpoint,
        "SHOP_QUEUE": queue_name,
        "SHOP_OUTBOX_TABLE": f"shop-outbox-{suffix}",
        "SHOP_ORDERS_TABLE": f"shop-orders-{suffix}",
        "SHOP_GATEWAY_FAILURE_RATE": "0.5",
    }
    yield env
    import boto3
    import redis

    client = boto3.client("dynamodb", endpoint_url=ddb_local_endpoint)
    for table in (env["SHOP_OUTBOX_TABLE"], env["SHOP_ORDERS_TABLE"]):
        with contextlib.suppress(client.exceptions.ResourceNotFoundException):
            client.delete_table(TableName=table)
    broker = redis.Redis.from_url(redis_url)
    keys = list(broker.scan_iter(match=f"*{queue_name}*"))
    if keys:
        broker.delete(*keys)


def test_shop_example(shop_env: dict[str, str], tmp_path: Path) -> None:
    """Tables, a worker with beat and ten orders: every event completes."""

    def python(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args],
            cwd=EXAMPLES,
            env=shop_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "created" in python("-m", "shop.tables")
    log = tmp_path / "shop-worker.log"
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "shop", "worker", "-B",
            "-s", str(tmp_path / "beat"), "-Q", shop_env["SHOP_QUEUE"],
            "-P", "threads", "-c", "4", "--without-mingle", "--without-gossip",
            "-l", "info", "-f", str(log),
        ],
        cwd=EXAMPLES,
        env=shop_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        placed = python("-m", "shop.orders", "5").split()
        assert placed.count("placed") == 5
        outbox = Outbox(
            config=OutboxConfig(
                table_name=shop_env["SHOP_OUTBOX_TABLE"],
                endpoint_url=shop_env["SHOP_DYNAMODB_URL"],
                completion=Completion.KEEP,
            )
        )
        wait_for(
            lambda: outbox.store.stats().counts["completed"] == 10,
            timeout_s=120,
            what="the shop's ten events",
        )
        assert outbox.store.stats().counts["failed"] == 0
        text = log.read_text()
        assert "Drained outbox" in text
        assert "start-up check: error" not in text  # the settings pass the checks
        # The threads pool cannot enforce time limits: a warning, logged.
        assert "start-up check: warning: worker_pool" in text
    finally:
        stop_process_group(worker)
