"""What happens when an order event is drained: one Celery task per event."""

import os
import random

from celery import Task
from celery.utils.log import get_task_logger

from celery_outbox import Event
from shop.celery_app import outbox

logger = get_task_logger(__name__)

# How often the gateway times out on a first attempt.
FAILURE_RATE = float(os.environ.get("SHOP_GATEWAY_FAILURE_RATE", "0.3"))


class PaymentGatewayError(Exception):
    """The payment provider could not be reached."""


@outbox.handler("order.placed", bind=True)
def send_confirmation(self: Task, event: Event) -> None:
    """Mail the customer; a plain task, retried by the outbox if it raises."""
    order = event.payload
    logger.info(
        "Confirmation for %s sent to %s (event %s, attempt %d)",
        order["order_id"],
        order["customer"],
        event.id,
        event.attempt,
    )


@outbox.handler(
    "payment.requested",
    autoretry_for=(PaymentGatewayError,),
    retry_backoff=True,  # Celery's backoff; the wait happens in DynamoDB
    max_retries=3,  # this handler gives up sooner than the outbox's 4
)
def capture_payment(event: Event) -> None:
    """Charge the order; the gateway times out now and then, a retry goes through."""
    if event.attempt == 1 and random.random() < FAILURE_RATE:
        raise PaymentGatewayError(f"gateway timeout for {event.payload['order_id']}")
    logger.info("Captured %s for %s", event.payload["total"], event.payload["order_id"])
