"""The shop's Celery app, with the outbox installed into it."""

from celery import Celery

from celery_outbox import Outbox

app = Celery("shop", include=["shop.handlers"])
app.config_from_object("shop.celeryconfig")

# Registers the outbox_* defaults, the celery_outbox.drain task with its
# beat entry, and the start-up checks.
outbox = Outbox(app)
