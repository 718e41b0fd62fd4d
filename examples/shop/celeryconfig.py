"""Celery settings of the shop, the outbox's among them.

Every value can be changed through the environment, so the same code runs
against a laptop's Redis and DynamoDB Local or against real services.
"""

import os

broker_url = os.environ.get("SHOP_BROKER_URL", "redis://127.0.0.1:6379/0")
task_default_queue = os.environ.get("SHOP_QUEUE", "shop")

# Handlers must finish well inside the outbox's lease (the worker checks
# this at start-up): 25 s of work under a 60 s lease.
task_time_limit = 25
task_soft_time_limit = 20

outbox_table_name = os.environ.get("SHOP_OUTBOX_TABLE", "shop-outbox")
outbox_endpoint_url = os.environ.get("SHOP_DYNAMODB_URL", "http://127.0.0.1:8000")
outbox_region_name = "us-east-1"
outbox_poll_interval_ms = 500
outbox_processing_timeout_ms = 60_000
outbox_max_retries = 4
outbox_completion = "keep"  # keep completed events a while, to look at

ORDERS_TABLE = os.environ.get("SHOP_ORDERS_TABLE", "shop-orders")
