"""DynamoDB faults injected through botocore's ``before-send`` event.

A handler registered for ``before-send`` may return a response instead of
letting botocore send the request. :class:`FaultInjector` does that for a
few percent of calls, so the client's own retry logic (``standard`` mode)
meets the errors a real table produces:

* ``throttle``: HTTP 400 ``ThrottlingException``, the request was not run;
* ``server``: HTTP 500 ``InternalServerError``, the request was not run;
* ``lost-reply``: the request *is* sent and applied, then a 500 stands in
  for the reply, as when a connection drops after DynamoDB did the work.
  The retry meets its own earlier write: a conditional write then fails its
  condition, and a put finds the item already there.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

import urllib3
from botocore.awsrequest import AWSResponse, HTTPHeaders

__all__ = ["KINDS", "FaultInjector"]

KINDS = ("throttle", "server", "lost-reply")

_ERRORS = {
    "throttle": (400, "ThrottlingException", "Rate of requests exceeds throughput"),
    "server": (500, "InternalServerError", "Internal server error"),
    "lost-reply": (500, "InternalServerError", "The reply was lost"),
}


class _Body:
    """The ``raw`` of an :class:`AWSResponse`: botocore reads ``stream()``."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **kwargs: Any) -> Any:
        yield self._data


class FaultInjector:
    """Fails a share of DynamoDB calls; each fault is reported to ``record``.

    Args:
        rate: the share of calls that fail, split between the kinds by
            ``weights``.
        record: called as ``record("fault", kind=..., op=...)`` per fault.
        weights: relative weight of each kind in :data:`KINDS`.
        rng: the source of randomness.
    """

    def __init__(
        self,
        rate: float,
        record: Callable[..., None],
        *,
        weights: tuple[float, float, float] = (0.5, 0.3, 0.2),
        rng: random.Random | None = None,
    ) -> None:
        self.rate = rate
        self.record = record
        self.weights = weights
        self._rng = rng or random.Random()
        self._http = urllib3.PoolManager(retries=False)
        self._pid = os.getpid()

    def install(self, events: Any) -> None:
        """Register on a botocore event emitter (a session's or a client's)."""
        events.register("before-send.dynamodb", self)

    def __call__(self, request: Any, event_name: str = "", **kwargs: Any) -> Any:
        if self._pid != os.getpid():
            # A forked child: draw its own faults, open its own connections.
            self._rng = random.Random()
            self._http = urllib3.PoolManager(retries=False)
            self._pid = os.getpid()
        if self._rng.random() >= self.rate:
            return None
        (kind,) = self._rng.choices(KINDS, weights=self.weights)
        operation = event_name.rsplit(".", 1)[-1]
        if kind == "lost-reply":
            # Do the work for real, then drop the reply on the floor.
            self._http.request(
                request.method,
                request.url,
                body=request.body,
                headers=dict(request.headers.items()),
            )
        self.record("fault", kind=kind, op=operation)
        status, code, message = _ERRORS[kind]
        body = json.dumps(
            {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}
        ).encode()
        headers = HTTPHeaders()
        headers["x-amzn-RequestId"] = "chaos"
        headers["Content-Type"] = "application/x-amz-json-1.0"
        headers["Content-Length"] = str(len(body))
        return AWSResponse(request.url, status, headers, _Body(body))
