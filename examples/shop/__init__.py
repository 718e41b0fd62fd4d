"""A small shop that tells the rest of its world about orders through an outbox.

``celery -A shop worker -B`` finds the Celery app here.
"""

from shop.celery_app import app, outbox

__all__ = ["app", "outbox"]
