"""The chaos run: many events through an outbox while things go wrong.

``python chaos/run.py`` starts DynamoDB Local, a Redis of its own, two Celery
workers, two beat schedulers and a drain loop whose clock runs ahead, emits
events, and meanwhile kills worker children, restarts Redis and makes a few
percent of DynamoDB calls fail. It then checks that no event was lost and
that every handler ran more than once only because an earlier attempt was
interrupted. See ``docs/reliability.md``.
"""
