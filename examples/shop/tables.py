"""Create the shop's tables: ``python -m shop.tables``."""

import boto3

from shop import celeryconfig
from shop.celery_app import outbox


def main() -> None:
    """Create the outbox table and the orders table if they are missing."""
    created = outbox.store.create_table()
    print(f"outbox table {outbox.store.table}: {'created' if created else 'exists'}")
    client = boto3.client(
        "dynamodb",
        endpoint_url=celeryconfig.outbox_endpoint_url,
        region_name=celeryconfig.outbox_region_name,
    )
    name = celeryconfig.ORDERS_TABLE
    if name in client.list_tables()["TableNames"]:
        print(f"orders table {name}: exists")
        return
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    client.get_waiter("table_exists").wait(TableName=name)
    print(f"orders table {name}: created")


if __name__ == "__main__":
    main()
