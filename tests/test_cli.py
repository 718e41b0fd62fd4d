"""The outbox commands, run in-process with click's runner against moto."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
import uuid
from collections.abc import Iterator
from typing import Any

import click
import pytest
from botocore.exceptions import EndpointConnectionError
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result

from celery_outbox import Event, Outbox, OutboxConfig, Status
from celery_outbox.cli import (
    EXIT_ABORTED,
    EXIT_ERROR,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    main,
)
from celery_outbox.cli import outbox as outbox_group


def fail_events(outbox: Outbox, *events: Event) -> None:
    """Publish ``events`` and move each to ``failed``."""
    outbox.store.publish(list(events))
    for lease in outbox.store.claim().leases:
        outbox.store.fail(lease, "ValueError: card declined", final=True)


def make_app(endpoint: str, *, create: bool = True, **conf: Any) -> Celery:
    """A Celery app with an outbox and one handler on a fresh moto table."""
    table = f"cli-{uuid.uuid4().hex[:10]}"
    app = Celery(table, broker="memory://", set_as_current=False)
    app.conf.update(outbox_table_name=table, outbox_endpoint_url=endpoint, **conf)
    outbox = Outbox(app)

    @outbox.handler("order.created", name=f"{table}.created", time_limit=10)
    def created(event: Event) -> None:
        """Does nothing."""

    if create:
        outbox.store.create_table()
    return app


@pytest.fixture
def app(moto_endpoint: str) -> Iterator[Celery]:
    """An app whose outbox table exists."""
    made = make_app(moto_endpoint)
    yield made
    outbox_of(made).store.delete_table()


def outbox_of(app: Celery) -> Outbox:
    """The outbox installed on ``app``."""
    from celery_outbox import management

    found = management.installed(app)
    assert found is not None
    return found


def invoke(app: Celery, *args: str, input: str | None = None) -> Result:
    """Run ``celery -A app outbox ARGS`` in-process."""
    obj = CLIContext(app=app, no_color=True, workdir=None)
    return CliRunner().invoke(outbox_group, list(args), obj=obj, input=input)


def error_line(result: Result) -> str:
    """The one line a failing command wrote to stderr."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output
    return lines[-1]


class TestFailed:
    """``outbox failed``."""

    def test_table_lists_failed_events(self, app: Celery) -> None:
        """The table shows each failed event's id, type, failed attempts and error.

        The count is retryCount, every failed attempt: an event that failed on
        its first attempt was never retried, so it must not read "RETRIES 1".
        """
        event = Event.new("order.created", {"email": "alice@example.com"})
        fail_events(outbox_of(app), event)
        result = invoke(app, "failed")
        assert result.exit_code == 0, result.output
        header, row = result.stdout.splitlines()
        assert header.split()[:5] == ["EVENT", "ID", "TYPE", "FAILED", "ATTEMPTS"]
        assert row.split()[:3] == [event.id, "order.created", "1"]
        assert row.endswith("ValueError: card declined")
        assert "alice" not in result.stdout

    def test_json_pages_with_a_cursor(self, app: Celery) -> None:
        """--json with --limit returns a cursor that --cursor follows."""
        events = [Event.new("order.created", {"n": i}) for i in range(3)]
        fail_events(outbox_of(app), *events)
        first = json.loads(invoke(app, "failed", "--json", "--limit", "2").stdout)
        assert len(first["events"]) == 2 and first["cursor"]
        rest = invoke(app, "failed", "--json", "--cursor", first["cursor"])
        second = json.loads(rest.stdout)
        assert second["cursor"] is None
        listed = {e["id"] for e in first["events"] + second["events"]}
        assert listed == {e.id for e in events}
        assert {e["payload"]["n"] for e in first["events"]} <= {0, 1, 2}

    def test_table_tells_how_to_get_the_next_page(self, app: Celery) -> None:
        """When more events remain, stderr names the --cursor to pass."""
        fail_events(outbox_of(app), Event.new("a.one"), Event.new("a.one"))
        result = invoke(app, "failed", "--limit", "1")
        assert result.exit_code == 0
        assert "--cursor " in result.stderr

    def test_type_filter(self, app: Celery) -> None:
        """--type lists only failed events of that type."""
        fail_events(outbox_of(app), Event.new("a.one"), Event.new("b.two"))
        result = json.loads(invoke(app, "failed", "--json", "--type", "b.two").stdout)
        assert [e["type"] for e in result["events"]] == ["b.two"]

    def test_none_failed(self, app: Celery) -> None:
        """With no failed events the command says so and succeeds."""
        result = invoke(app, "failed")
        assert result.exit_code == 0
        assert result.stdout.strip() == "No failed events."

    @pytest.mark.parametrize(
        "args", [["--limit", "0"], ["--limit", "x"], ["--cursor", "junk"], ["--bogus"]]
    )
    def test_bad_arguments(self, app: Celery, args: list[str]) -> None:
        """Bad arguments exit with 2 and an error line."""
        result = invoke(app, "failed", *args)
        assert result.exit_code == EXIT_USAGE
        assert error_line(result).startswith("Error:")


class TestRetry:
    """``outbox retry``."""

    def test_confirmed_retry_of_ids(self, app: Celery) -> None:
        """Given ids are retried once the operator answers yes."""
        event = Event.new("order.created")
        fail_events(outbox_of(app), event)
        result = invoke(app, "retry", event.id, input="y\n")
        assert result.exit_code == 0, result.output
        assert "Retried 1 events." in result.stdout
        assert outbox_of(app).store.status_of(event.id) is Status.CREATED

    def test_declined_retry_changes_nothing(self, app: Celery) -> None:
        """Answering no exits with 4 and leaves the events failed."""
        event = Event.new("order.created")
        fail_events(outbox_of(app), event)
        result = invoke(app, "retry", event.id, input="n\n")
        assert result.exit_code == EXIT_ABORTED
        assert "nothing was retried" in error_line(result)
        assert outbox_of(app).store.status_of(event.id) is Status.FAILED

    def test_all_failed_of_a_type(self, app: Celery) -> None:
        """--all-failed --type retries every failed event of that type only."""
        one, two = Event.new("a.one"), Event.new("b.two")
        fail_events(outbox_of(app), one, two)
        args = ["--all-failed", "--type", "b.two", "--yes", "--json"]
        result = invoke(app, "retry", *args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["retried"] == [two.id]
        assert outbox_of(app).store.status_of(one.id) is Status.FAILED

    def test_all_failed_with_none_failed_is_still_json(self, app: Celery) -> None:
        """--json prints the (empty) report when nothing is failed, for scripts."""
        result = invoke(app, "retry", "--all-failed", "--yes", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {
            "retried": [],
            "missing": [],
            "not_failed": [],
        }

    def test_all_failed_asks_with_the_count(self, app: Celery) -> None:
        """The confirmation names how many events would be retried."""
        fail_events(outbox_of(app), Event.new("a.one"), Event.new("a.one"))
        result = invoke(app, "retry", "--all-failed", input="n\n")
        assert "Retry 2 failed events in table" in result.stdout

    def test_unknown_and_not_failed_ids(self, app: Celery) -> None:
        """Ids that are not stored or not failed are reported; exit code 3."""
        live = outbox_of(app).emit("order.created")
        result = invoke(app, "retry", "--yes", live.id, "nope")
        assert result.exit_code == EXIT_PROBLEMS
        assert "Not found: nope" in result.stderr
        assert f"Not failed, left as they are: {live.id}" in result.stderr

    @pytest.mark.parametrize(
        "args", [[], ["x", "--all-failed"], ["x", "--type", "a.one"], ["--type", "t"]]
    )
    def test_bad_arguments(self, app: Celery, args: list[str]) -> None:
        """Ids and --all-failed exclude each other; --type needs --all-failed."""
        result = invoke(app, "retry", "--yes", *args)
        assert result.exit_code == EXIT_USAGE
        assert error_line(result).startswith("Error:")


class TestStats:
    """``outbox stats``."""

    def test_text_and_json(self, app: Celery) -> None:
        """stats prints counts per status, as a table or as JSON."""
        outbox_of(app).emit("order.created")
        text = invoke(app, "stats")
        assert text.exit_code == 0
        assert "created    1" in text.stdout
        assert "due now    1 (oldest waiting" in text.stdout
        data = json.loads(invoke(app, "stats", "--json").stdout)
        assert data["counts"]["created"] == 1 and data["due"] == 1

    def test_missing_table_is_one_line(self, moto_endpoint: str) -> None:
        """Without a table, stats exits with 1 and one line naming it."""
        app = make_app(moto_endpoint, create=False)
        result = invoke(app, "stats")
        assert result.exit_code == EXIT_ERROR
        assert app.conf.outbox_table_name in error_line(result)


class TestCreateTable:
    """``outbox create-table``."""

    def test_creates_once(self, moto_endpoint: str) -> None:
        """The table is created the first time and left alone the second."""
        app = make_app(moto_endpoint, create=False)
        first = invoke(app, "create-table")
        assert first.exit_code == 0, first.output
        assert first.stdout.startswith("Created table")
        second = invoke(app, "create-table")
        assert second.exit_code == 0
        assert "already exists" in second.stdout
        outbox_of(app).store.verify_table()
        outbox_of(app).store.delete_table()

    def test_table_option_names_another_table(self, app: Celery) -> None:
        """--table works on another table than the app's setting names."""
        other = f"other-{uuid.uuid4().hex[:8]}"
        result = invoke(app, "--table", other, "create-table")
        assert result.exit_code == 0
        assert other in result.stdout
        store = outbox_of(app).store
        described = store.client.describe_table(TableName=other)["Table"]
        assert described["TableName"] == other
        store.client.delete_table(TableName=other)


class TestCheck:
    """``outbox check``."""

    def test_all_right(self, app: Celery) -> None:
        """A laid-out table and a handler limit under the lease pass."""
        result = invoke(app, "check")
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("OK:")

    def test_missing_table(self, moto_endpoint: str) -> None:
        """A missing table is a problem: exit code 3."""
        app = make_app(moto_endpoint, create=False)
        result = invoke(app, "check")
        assert result.exit_code == EXIT_PROBLEMS
        assert "PROBLEM: table" in result.stderr and "does not exist" in result.stderr

    def test_time_limit_not_below_the_lease(self, moto_endpoint: str) -> None:
        """A handler time limit at or above the lease is a problem."""
        app = make_app(moto_endpoint, outbox_processing_timeout_ms=10_000)
        result = invoke(app, "check")
        assert result.exit_code == EXIT_PROBLEMS
        problem = result.stderr.splitlines()[0]
        assert problem.startswith("PROBLEM:")
        assert "order.created" in problem and "time_limit" in problem
        assert "10" in problem
        outbox_of(app).store.delete_table()

    def test_no_time_limit_is_a_warning(self, moto_endpoint: str) -> None:
        """A handler without any time limit is a warning, not a failure."""
        app = make_app(moto_endpoint)
        outbox = outbox_of(app)

        @outbox.handler("order.paid", name=f"{uuid.uuid4().hex}.paid")
        def paid(event: Event) -> None:
            """Has no time limit."""

        result = invoke(app, "check")
        assert result.exit_code == 0
        warning = result.stdout.splitlines()[0]
        assert warning.startswith("WARNING:") and "order.paid" in warning
        assert "no time limit" in warning
        outbox.store.delete_table()

    def test_visibility_timeout_below_the_lease(self, moto_endpoint: str) -> None:
        """A Redis visibility timeout shorter than the lease is a problem."""
        app = make_app(
            moto_endpoint, broker_transport_options={"visibility_timeout": 20}
        )
        app.conf.broker_url = "redis://127.0.0.1:6379/3"
        result = invoke(app, "check")
        assert result.exit_code == EXIT_PROBLEMS
        problem = result.stderr.splitlines()[0]
        assert problem.startswith("PROBLEM:")
        assert "visibility_timeout" in problem and "20" in problem
        outbox_of(app).store.delete_table()


class TestIamPolicy:
    """``outbox iam-policy``."""

    def test_policy_names_table_and_index(self, app: Celery) -> None:
        """The policy grants item actions on the table and Query on the index."""
        result = invoke(
            app, "iam-policy", "--region", "eu-west-1", "--account", "123456789012"
        )
        assert result.exit_code == 0
        table, index = json.loads(result.stdout)["Statement"]
        name = app.conf.outbox_table_name
        arn = f"arn:aws:dynamodb:eu-west-1:123456789012:table/{name}"
        assert table["Resource"] == arn
        assert "dynamodb:UpdateItem" in table["Action"]
        assert "dynamodb:CreateTable" not in table["Action"]
        assert index == {
            "Sid": "OutboxStatusIndex",
            "Effect": "Allow",
            "Action": ["dynamodb:Query"],
            "Resource": f"{arn}/index/status-gsiSortKey-index",
        }

    def test_create_table_and_configured_region(self, moto_endpoint: str) -> None:
        """--create-table adds the setup actions; the region defaults to config."""
        app = make_app(moto_endpoint, create=False, outbox_region_name="ap-south-1")
        result = invoke(app, "iam-policy", "--create-table")
        table = json.loads(result.stdout)["Statement"][0]
        assert "dynamodb:CreateTable" in table["Action"]
        assert table["Resource"].startswith("arn:aws:dynamodb:ap-south-1:*:table/")

    @pytest.mark.parametrize(
        "args",
        [
            ["--account", "123"],
            ["--partition", "mars"],
            ["--region"],
            ["--region", ""],
            ["--region", "eu west 1"],
            ["--region", "arn:aws:x"],
        ],
    )
    def test_bad_arguments(self, app: Celery, args: list[str]) -> None:
        """A malformed account, region, unknown partition or missing value: 2.

        A bad region would otherwise print a policy whose ARNs match nothing.
        """
        result = invoke(app, "iam-policy", *args)
        assert result.exit_code == EXIT_USAGE
        assert error_line(result).startswith("Error:")


class TestErrors:
    """Errors end in one line and an exit code, never a traceback."""

    def test_invalid_setting_is_usage(self, moto_endpoint: str) -> None:
        """An invalid outbox_* setting exits with 2, naming the setting."""
        app = make_app(moto_endpoint, create=False)
        outbox_of(app)._config = None
        app.conf.outbox_batch_size = 0
        result = invoke(app, "stats")
        assert result.exit_code == EXIT_USAGE
        assert error_line(result).startswith("Error: outbox_batch_size:")

    def test_connection_error(
        self, app: Celery, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A botocore error exits with 1 and one line."""

        def unreachable(**_: Any) -> None:
            raise EndpointConnectionError(endpoint_url="http://nowhere")

        monkeypatch.setattr(outbox_of(app).store, "stats", unreachable)
        result = invoke(app, "stats")
        assert result.exit_code == EXIT_ERROR
        assert error_line(result).startswith("Error: DynamoDB: Could not connect")

    def test_unexpected_error(
        self, app: Celery, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unexpected error is one line, or a traceback with --traceback."""

        def broken() -> None:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(outbox_of(app).store, "stats", broken)
        result = invoke(app, "stats")
        assert result.exit_code == EXIT_ERROR
        assert "unexpected RuntimeError: disk on fire" in error_line(result)
        traced = invoke(app, "--traceback", "stats")
        assert isinstance(traced.exception, RuntimeError)


class TestMain:
    """The ``celery-outbox`` console script."""

    def test_runs_without_an_app(self, moto_endpoint: str) -> None:
        """Without -A, --table and --endpoint-url name the table."""
        table = f"main-{uuid.uuid4().hex[:8]}"
        runner = CliRunner()
        base = ["--table", table, "--endpoint-url", moto_endpoint]
        assert runner.invoke(main, [*base, "create-table"]).exit_code == 0
        result = runner.invoke(main, [*base, "stats", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["due"] == 0
        store = OutboxConfig(table_name=table, endpoint_url=moto_endpoint)
        Outbox(config=store).store.delete_table()

    def test_bad_app(self) -> None:
        """An -A that cannot be imported exits with 2."""
        result = CliRunner().invoke(main, ["-A", "no_such_module_here", "stats"])
        assert result.exit_code == EXIT_USAGE
        assert "cannot load 'no_such_module_here'" in result.output

    def test_demo_is_loaded_lazily(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The demo command comes from celery_outbox.demo, imported on use."""
        ran: list[bool] = []

        @click.command()
        def demo() -> None:
            ran.append(True)

        module = types.ModuleType("celery_outbox.demo")
        module.__spec__ = importlib.machinery.ModuleSpec("celery_outbox.demo", None)
        module.demo = demo  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "celery_outbox.demo", module)
        assert "demo" in CliRunner().invoke(main, ["--help"]).output
        assert CliRunner().invoke(main, ["demo"]).exit_code == 0
        assert ran == [True]
