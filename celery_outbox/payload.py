"""Payloads: JSON-compatible values stored as native DynamoDB values.

A payload is whatever ``json.dumps`` would accept without a custom encoder,
minus the values JSON cannot carry faithfully (NaN, infinities) and those it
would silently change (tuples, non-string keys). It is stored as a DynamoDB
value (a map, list, number...) rather than a JSON string, as the TypeScript
adapter does, so both libraries read each other's events.

boto3's ``TypeSerializer`` and ``TypeDeserializer`` do the marshalling. The
only conversions of our own are at the number boundary. DynamoDB, like JSON,
does not tell ``3.0`` from ``3``: an integral number below 10**38 comes back
as an ``int``, any other number as a ``float``. So a float goes in as the
``Decimal`` of its shortest repr, except an integral float below 10**38,
which goes in as its exact integer: ``3.608688818084449e16`` is really
36086888180844488, and must not come back as 36086888180844490. Integers
above 38 digits are refused, so a larger integral value can only have been
a float.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import (
    DYNAMODB_CONTEXT,
    TypeDeserializer,
    TypeSerializer,
)

from celery_outbox.errors import PayloadError

__all__ = ["from_dynamodb", "to_dynamodb", "validate"]

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()

# DynamoDB numbers hold 38 significant digits; larger integers would be
# rounded, which breaks "large integers round-trip exactly".
_MAX_DIGITS = 38
_INT_LIMIT = 10**_MAX_DIGITS
# DynamoDB Local refuses a payload of 32 maps nested in each other and takes
# 31: the item's own level counts towards DynamoDB's limit of 32.
_MAX_NESTING = 31
_HINTS = {
    "tuple": "use a list",
    "set": "use a list",
    "frozenset": "use a list",
    "bytes": "encode it, e.g. base64, into a string",
    "bytearray": "encode it, e.g. base64, into a string",
    "datetime": "use an ISO-8601 string",
    "date": "use an ISO-8601 string",
    "Decimal": "use an int, a float or a string",
}


def validate(value: Any, path: str = "payload") -> None:
    """Raise :class:`PayloadError` naming the first non-JSON value in ``value``.

    The path reads like Python, e.g. ``payload['items'][2]['price']``.
    """
    _check(value, path, 0)


def _check(value: Any, path: str, depth: int) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value, path, "string")
        return
    if isinstance(value, int):
        if len(str(abs(value))) > _MAX_DIGITS:
            raise PayloadError(
                path,
                f"integer has more than {_MAX_DIGITS} digits, "
                "which DynamoDB cannot store exactly; send it as a string",
            )
        return
    if isinstance(value, float):
        _check_float(value, path)
        return
    if isinstance(value, list | dict):
        if depth >= _MAX_NESTING:
            raise PayloadError(
                path,
                f"lists and maps are nested more than {_MAX_NESTING} "
                "deep, which DynamoDB refuses",
            )
        if isinstance(value, list):
            for index, item in enumerate(value):
                _check(item, f"{path}[{index}]", depth + 1)
            return
        for key, item in value.items():
            where = f"{path}[{key!r}]"
            if not isinstance(key, str):
                raise PayloadError(
                    where, f"map keys must be strings, got {type(key).__name__}"
                )
            if not key:
                raise PayloadError(where, "map keys must not be empty in DynamoDB")
            _check_text(key, where, "map key")
            _check(item, where, depth + 1)
        return
    name = type(value).__name__
    hint = _HINTS.get(name, "only JSON values are allowed")
    raise PayloadError(path, f"{name} is not JSON-compatible; {hint}")


def _check_text(value: str, path: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate cannot travel as UTF-8: the request would fail
        # inside botocore, after validation said yes.
        raise PayloadError(
            path, f"{what} is not valid Unicode (it holds {exc.object[exc.start]!r})"
        ) from None


def _check_float(value: float, path: str) -> None:
    if not math.isfinite(value):
        raise PayloadError(path, f"{value!r} is not a JSON number")
    if value and not 1e-130 <= abs(value) < 1e126:
        raise PayloadError(
            path,
            f"{value!r} is outside DynamoDB's number range "
            "(1e-130 to 1e126 in magnitude)",
        )


def _to_decimal(value: Any) -> Any:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < _INT_LIMIT:
            return Decimal(int(value))
        # repr gives the shortest string that reads back as the same float.
        return DYNAMODB_CONTEXT.create_decimal(repr(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)  # an IntEnum member is stored as its number
    if isinstance(value, list):
        return [_to_decimal(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_decimal(v) for k, v in value.items()}
    return value


def _from_decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        # copy_abs, not abs(): abs rounds to the context's 28 digits.
        if value == value.to_integral_value() and value.copy_abs() < _INT_LIMIT:
            return int(value)
        return float(value)
    if isinstance(value, list):
        return [_from_decimal(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_decimal(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        # Sets are never written by us; an item from elsewhere may hold one.
        return sorted(_from_decimal(v) for v in value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value


def to_dynamodb(value: Any, path: str = "payload") -> dict[str, Any]:
    """Validate ``value`` and return it as a typed DynamoDB attribute value."""
    validate(value, path)
    try:
        typed: dict[str, Any] = _serializer.serialize(_to_decimal(value))  # type: ignore[assignment]
        return typed
    except (TypeError, ArithmeticError) as exc:  # e.g. a float too small
        raise PayloadError(path, f"cannot be stored in DynamoDB: {exc}") from exc


def from_dynamodb(attribute: dict[str, Any]) -> Any:
    """Return the Python value of a typed DynamoDB attribute value."""
    return _from_decimal(_deserializer.deserialize(attribute))  # type: ignore[arg-type]
