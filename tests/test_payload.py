"""Payload marshalling: JSON values in and out of DynamoDB's types, exactly."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import IntEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_outbox import payload
from celery_outbox.errors import PayloadError

ROUND_TRIPS: list[tuple[str, Any]] = [
    ("float", 30.4),
    ("int", 3),
    ("true", True),
    ("false", False),
    ("null", None),
    ("large int", 12345678901234567890123456789012345678),
    ("negative large int", -(10**37) - 7),
    ("small float", 1.5e-120),
    ("large float", 9.99e125),
    ("float with 17 digits", 0.1 + 0.2),
    ("38-digit int", 99999999999999999999999999995000000000),
    ("integral float above 1e38", 1e40),
    ("empty string", ""),
    ("unicode", "grüße, 東京, emoji 🎉"),
    ("string payload", "just a string"),
    ("list payload", [1, "two", 3.5, None, False]),
    ("empty list", []),
    ("empty map", {}),
    ("nested", {"order": {"lines": [{"sku": "a", "qty": 2, "price": 9.99}]}}),
    ("map with empty strings", {"note": "", "tags": ["", "x"]}),
]


@pytest.mark.parametrize(
    "value", [v for _, v in ROUND_TRIPS], ids=[n for n, _ in ROUND_TRIPS]
)
def test_round_trip(value: Any) -> None:
    """Every JSON value comes back equal and of the same type."""
    back = payload.from_dynamodb(payload.to_dynamodb(value))
    assert back == value
    assert type(back) is type(value)


def test_native_types() -> None:
    """Payloads are stored as DynamoDB maps and numbers, not as JSON strings."""
    typed = payload.to_dynamodb({"total": 30.4, "n": 3, "ok": True, "x": None})
    assert typed == {
        "M": {
            "total": {"N": "30.4"},
            "n": {"N": "3"},
            "ok": {"BOOL": True},
            "x": {"NULL": True},
        }
    }


@pytest.mark.parametrize("value", [3.0, -0.0, 1e20, 3.608688818084449e16])
def test_integral_float_comes_back_as_equal_int(value: float) -> None:
    """DynamoDB keeps no difference between 3.0 and 3: an equal int returns."""
    back = payload.from_dynamodb(payload.to_dynamodb(value))
    assert type(back) is int
    assert back == value  # exactly: the int is the float's true value


def test_int_enum_is_stored_as_its_number() -> None:
    """An IntEnum member is stored as the plain number it stands for."""

    class Size(IntEnum):
        LARGE = 3

    assert payload.to_dynamodb(Size.LARGE) == {"N": "3"}


REJECTED: list[tuple[str, Any, str, str]] = [
    ("nan", {"a": math.nan}, "payload['a']", "not a JSON number"),
    ("inf", [1, math.inf], "payload[1]", "not a JSON number"),
    ("-inf", -math.inf, "payload", "not a JSON number"),
    ("set", {"tags": {"a"}}, "payload['tags']", "set is not JSON-compatible"),
    ("frozenset", frozenset(), "payload", "use a list"),
    ("bytes", {"blob": b"x"}, "payload['blob']", "base64"),
    ("bytearray", bytearray(b"x"), "payload", "base64"),
    ("datetime", {"at": datetime.now(UTC)}, "payload['at']", "ISO-8601"),
    ("date", [date.today()], "payload[0]", "ISO-8601"),
    ("tuple", {"pair": (1, 2)}, "payload['pair']", "tuple"),
    ("decimal", Decimal("1.5"), "payload", "Decimal"),
    ("int key", {"a": {1: "x"}}, "payload['a'][1]", "map keys must be strings"),
    ("empty key", {"": 1}, "payload['']", "must not be empty"),
    ("39 digits", {"n": 10**38}, "payload['n']", "more than 38 digits"),
    ("too big float", 1e200, "payload", "number range"),
    ("too small float", [5e-324], "payload[0]", "number range"),
    ("lone surrogate", {"s": "\ud800"}, "payload['s']", "not valid Unicode"),
    ("surrogate key", {"\udfff": 1}, "payload['\\udfff']", "not valid Unicode"),
    ("object", {"o": object()}, "payload['o']", "only JSON values"),
]


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [r[1:] for r in REJECTED],
    ids=[r[0] for r in REJECTED],
)
def test_rejected(value: Any, path: str, words: str) -> None:
    """A non-JSON value is refused with an error naming where it sits."""
    with pytest.raises(PayloadError) as caught:
        payload.to_dynamodb(value)
    assert caught.value.path == path
    assert str(caught.value).startswith(path + ": ")
    assert words in str(caught.value)


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"k": value}
    return value


def test_nesting_limit() -> None:
    """31 nested maps are accepted and 32 refused, as DynamoDB Local does."""
    payload.validate(_nested(31))
    with pytest.raises(PayloadError, match="nested more than 31 deep"):
        payload.validate(_nested(32))


def test_nested_path_is_named() -> None:
    """The path of a deep bad value names every step to it."""
    with pytest.raises(PayloadError) as caught:
        payload.validate({"order": {"lines": [{"price": math.nan}]}})
    assert caught.value.path == "payload['order']['lines'][0]['price']"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1)
    | st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: f == 0 or 1e-130 <= abs(f) < 1e126
    )
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(min_size=1), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_round_trips(value: Any) -> None:
    """Any JSON value in DynamoDB's range comes back equal."""
    try:
        payload.validate(value)
    except PayloadError:
        return  # a generated string with a lone surrogate, say
    assert payload.from_dynamodb(payload.to_dynamodb(value)) == value
