"""Placing orders: the order and its events in one DynamoDB transaction.

Run ``python -m shop.orders 10`` to place ten orders.
"""

import sys
import uuid
from decimal import Decimal

from shop import celeryconfig
from shop.celery_app import outbox


def place_order(customer: str, items: list[dict[str, object]]) -> str:
    """Save the order and announce it, both or neither."""
    order_id = f"order-{uuid.uuid4().hex[:8]}"
    total = str(sum(Decimal(str(i["price"])) * int(str(i["qty"])) for i in items))
    with outbox.transaction() as tx:
        tx.put(
            celeryconfig.ORDERS_TABLE,
            {"id": order_id, "customer": customer, "items": items, "total": total},
            condition="attribute_not_exists(#id)",
            names={"#id": "id"},
        )
        outbox.emit(
            "order.placed",
            {"order_id": order_id, "customer": customer, "total": total},
        )
        outbox.emit("payment.requested", {"order_id": order_id, "total": total})
    return order_id


def main() -> None:
    """Place the number of orders given on the command line (default 5)."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for n in range(count):
        order_id = place_order(
            f"customer-{n}@example.com",
            [{"sku": "tea-1kg", "qty": n + 1, "price": 12.5}],
        )
        print(f"placed {order_id}")


if __name__ == "__main__":
    main()
