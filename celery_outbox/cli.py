"""The command line: ``celery -A proj outbox ...`` and ``celery-outbox``.

``outbox`` is a Celery sub-command (entry point ``celery.commands``), so it
uses the app, broker and settings the ``celery`` command loaded::

    celery -A proj outbox failed --type order.created
    celery -A proj outbox retry --all-failed --type order.created --yes
    celery -A proj outbox stats --json
    celery -A proj outbox create-table
    celery -A proj outbox check
    celery -A proj outbox iam-policy --region eu-west-1 --account 123456789012

``celery-outbox`` offers the same commands (``-A`` optional; without it the
``--table``/``--endpoint-url`` options or the defaults name the table), and
``demo``.

Exit codes:

== =====================================================================
0  done
1  DynamoDB or the outbox reported an error (one line on stderr)
2  bad usage: an unknown option, a bad value, an invalid ``outbox_*``
   setting
3  done, but with problems: ``check`` found some, or ``retry`` left ids
   that are not stored or not failed
4  aborted: ``retry`` was not confirmed
== =====================================================================
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import click
from botocore.exceptions import BotoCoreError, ClientError

from celery_outbox import diagnosis, iam, management, settings
from celery_outbox.errors import OutboxError
from celery_outbox.inspection import RetryReport
from celery_outbox.outbox import Outbox

__all__ = [
    "EXIT_ABORTED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "main",
    "outbox",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PROBLEMS = 3
EXIT_ABORTED = 4

_REGION = re.compile(r"[a-z]{2,}(-[a-z]+)+-[0-9]+")
"""An AWS region name: eu-west-1, us-gov-west-1, ap-southeast-3."""
_OVERRIDES = "celery_outbox.overrides"
_TRACEBACK = "celery_outbox.traceback"

F = TypeVar("F", bound=Callable[..., Any])


class _Fail(Exception):
    """Stop a command with a one-line message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int) -> NoReturn:
    raise _Fail(message, code)


def _handled(fn: F) -> F:
    """Turn the errors a command may meet into one line and an exit code."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit):
            raise
        except _Fail as exc:
            message, code = str(exc), exc.code
        except OutboxError as exc:
            # The outbox raises bad input (a setting, a cursor, an id) as
            # errors that are also ValueErrors; the rest come from DynamoDB.
            message = str(exc)
            code = EXIT_USAGE if isinstance(exc, ValueError) else EXIT_ERROR
        except (BotoCoreError, ClientError) as exc:
            message, code = f"DynamoDB: {exc}", EXIT_ERROR
        except Exception as exc:
            if ctx.meta.get(_TRACEBACK):
                raise
            message = (
                f"unexpected {type(exc).__name__}: {exc} "
                "(add --traceback after 'outbox' to see where)"
            )
            code = EXIT_ERROR
        click.echo(f"Error: {' '.join(message.split())}", err=True)
        ctx.exit(code)

    return run  # type: ignore[return-value]


def _table_options(fn: F) -> F:
    """Options naming another table than the app's settings do."""
    options = [
        click.option("--table", help="The table (default: outbox_table_name)."),
        click.option("--index", help="Its status index (outbox_status_index_name)."),
        click.option("--endpoint-url", help="The DynamoDB endpoint (DynamoDB Local)."),
        click.option("--region", "region_name", help="The AWS region of the table."),
        click.option(
            "--traceback", is_flag=True, help="Show the traceback of unexpected errors."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _remember(
    ctx: click.Context,
    table: str | None,
    index: str | None,
    endpoint_url: str | None,
    region_name: str | None,
    traceback: bool,
) -> None:
    given = {
        "table_name": table,
        "status_index_name": index,
        "endpoint_url": endpoint_url,
        "region_name": region_name,
    }
    ctx.meta[_OVERRIDES] = {k: v for k, v in given.items() if v is not None}
    ctx.meta[_TRACEBACK] = traceback


def _app(ctx: click.Context) -> Any:
    from celery.bin.base import CLIContext

    found = ctx.find_object(CLIContext)
    if found is None:
        raise click.UsageError("no Celery app; run as `celery -A proj outbox ...`")
    return found.app


def _outbox(ctx: click.Context) -> Outbox:
    """The app's outbox, with the table options applied."""
    app = _app(ctx)
    installed = management.installed(app)
    if installed is None:
        # The outbox may be made in a module the app imports on demand.
        app.loader.import_default_modules()
        installed = management.installed(app)
    overrides = ctx.meta.get(_OVERRIDES) or {}
    if installed is not None and not overrides:
        return installed
    if installed is not None:
        config = installed.config
    else:
        config = settings.config_from_app(app)
    chosen = Outbox(config=config.replace(**overrides))
    if installed is not None:
        chosen.handlers = installed.handlers
    return chosen


# -- groups -------------------------------------------------------------------


@click.group(name="outbox")
@_table_options
@click.pass_context
def outbox(
    ctx: click.Context,
    table: str | None,
    index: str | None,
    endpoint_url: str | None,
    region_name: str | None,
    traceback: bool,
) -> None:
    """Inspect and operate the transactional outbox of this Celery app."""
    # No **kwargs: Celery hands the app's preload options to callbacks that
    # take none through its user_preload_options signal instead.
    _remember(ctx, table, index, endpoint_url, region_name, traceback)


class _Main(click.Group):
    """The ``celery-outbox`` group; ``demo`` is imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        if importlib.util.find_spec("celery_outbox.demo") is not None:
            names = sorted([*names, "demo"])
        return names

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "demo" and importlib.util.find_spec("celery_outbox.demo"):
            command: click.Command = importlib.import_module("celery_outbox.demo").demo
            return command
        return super().get_command(ctx, cmd_name)


@click.group(name="celery-outbox", cls=_Main)
@click.option("-A", "--app", "app_name", help="The Celery app, as for `celery -A`.")
@_table_options
@click.pass_context
def main(
    ctx: click.Context,
    app_name: str | None,
    table: str | None,
    index: str | None,
    endpoint_url: str | None,
    region_name: str | None,
    traceback: bool,
) -> None:
    """The transactional outbox for Celery on DynamoDB: demo and operations."""
    from celery import Celery
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext

    _remember(ctx, table, index, endpoint_url, region_name, traceback)
    try:
        app = find_app(app_name) if app_name else Celery("celery_outbox")
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {app_name!r}: {exc}") from None
    ctx.obj = CLIContext(app=app, no_color=False, workdir=None)


# -- commands -----------------------------------------------------------------


@click.command()
@click.option("--type", "event_type", help="Only events of this type.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Events per page.",
)
@click.option("--cursor", help="Where the previous page ended.")
@click.option("--json", "as_json", is_flag=True, help="JSON, with the payloads.")
@click.pass_context
@_handled
def failed(
    ctx: click.Context,
    event_type: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List failed events, newest failure first."""
    page = _outbox(ctx).store.failed(limit=limit, cursor=cursor, type=event_type)
    if as_json:
        events = [f.as_dict() for f in page.events]
        click.echo(json.dumps({"events": events, "cursor": page.cursor}, indent=2))
        return
    if not page.events:
        click.echo("No failed events.")
        return
    rows = [
        [f.event.id, f.event.type, str(f.retry_count), _when(f.failed_ms), f.last_error]
        for f in page.events
    ]
    header = ["EVENT ID", "TYPE", "FAILED ATTEMPTS", "FAILED AT", "LAST ERROR"]
    click.echo(_table(header, rows))
    if page.cursor:
        click.echo(f"More failed events: add --cursor {page.cursor}", err=True)


@click.command()
@click.argument("ids", nargs=-1)
@click.option("--all-failed", is_flag=True, help="Retry every failed event.")
@click.option("--type", "event_type", help="With --all-failed: only this type.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@_handled
def retry(
    ctx: click.Context,
    ids: tuple[str, ...],
    all_failed: bool,
    event_type: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Move failed events back to due, with their retries reset.

    Name the events by id, or pass --all-failed (with --type to narrow it).
    """
    if ids and all_failed:
        raise click.UsageError("give event ids or --all-failed, not both")
    if not ids and not all_failed:
        raise click.UsageError("give event ids, or --all-failed for every failed one")
    if event_type is not None and not all_failed:
        raise click.UsageError("--type narrows --all-failed; it does not filter ids")
    store = _outbox(ctx).store
    chosen = list(ids) or [f.event.id for f in store.iter_failed(type=event_type)]
    if not chosen:
        if as_json:
            click.echo(json.dumps(RetryReport().as_dict(), indent=2))
            return
        of_type = f" of type {event_type!r}" if event_type else ""
        click.echo(f"No failed events{of_type}.")
        return
    what = "failed events" if all_failed else "events"
    of_type = f" of type {event_type!r}" if event_type else ""
    question = f"Retry {len(chosen)} {what}{of_type} in table {store.table!r}?"
    if not yes and not _confirm(question):
        _fail(
            "not confirmed; nothing was retried (pass --yes to skip the question)",
            EXIT_ABORTED,
        )
    report = store.retry(chosen)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(f"Retried {len(report.retried)} events.")
        if report.missing:
            click.echo(f"Not found: {', '.join(report.missing)}", err=True)
        if report.not_failed:
            left = ", ".join(report.not_failed)
            click.echo(f"Not failed, left as they are: {left}", err=True)
    if report.missing or report.not_failed:
        ctx.exit(EXIT_PROBLEMS)


def _confirm(question: str) -> bool:
    try:
        return click.confirm(question, default=False)
    except click.Abort:  # no terminal to answer on
        return False


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@_handled
def stats(ctx: click.Context, as_json: bool) -> None:
    """Count events per status, and how long the oldest due one has waited."""
    found = _outbox(ctx).store.stats()
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2))
        return
    rows = [[status, str(count)] for status, count in found.counts.items()]
    age = found.oldest_due_age_ms
    waited = "" if age is None else f" (oldest waiting {age / 1000:.1f} s)"
    rows.append(["due now", f"{found.due}{waited}"])
    click.echo(_table(["STATUS", "EVENTS"], rows))


@click.command("create-table")
@click.pass_context
@_handled
def create_table(ctx: click.Context) -> None:
    """Create the table, its status index and TTL (nothing if it exists)."""
    store = _outbox(ctx).store
    created = store.create_table()
    store.verify_table()
    if created:
        click.echo(f"Created table {store.table!r} with index {store.index!r} and TTL.")
    else:
        click.echo(f"Table {store.table!r} already exists and is laid out right.")


@click.command()
@click.pass_context
@_handled
def check(ctx: click.Context) -> None:
    """Check the table, index and TTL, and settings that clash with the lease."""
    chosen = _outbox(ctx)
    findings = diagnosis.diagnose(chosen.store, app=_app(ctx), handlers=chosen.handlers)
    for finding in findings:
        label = "PROBLEM" if finding.problem else "WARNING"
        click.echo(f"{label}: {finding.message}", err=finding.problem)
    problems = sum(f.problem for f in findings)
    if problems:
        click.echo(f"{problems} problem(s) found.", err=True)
        ctx.exit(EXIT_PROBLEMS)
    click.echo(f"OK: table {chosen.store.table!r} and its settings look right.")


@click.command("iam-policy")
@click.option(
    "--region",
    "policy_region",
    default="*",
    show_default=True,
    help="The table's region.",
)
@click.option("--account", default="*", show_default=True, help="The AWS account id.")
@click.option(
    "--partition",
    default="aws",
    show_default=True,
    type=click.Choice(["aws", "aws-cn", "aws-us-gov"]),
)
@click.option(
    "--create-table", "setup", is_flag=True, help="Also grant what create-table needs."
)
@click.pass_context
@_handled
def iam_policy(
    ctx: click.Context, policy_region: str, account: str, partition: str, setup: bool
) -> None:
    """Print the least-privilege IAM policy for the outbox table and index."""
    if account != "*" and not (account.isdigit() and len(account) == 12):
        raise click.BadParameter(
            "expected a 12-digit account id or *", param_hint="--account"
        )
    if policy_region != "*" and not _REGION.fullmatch(policy_region):
        raise click.BadParameter(
            f"expected an AWS region such as eu-west-1, or *, got {policy_region!r}",
            param_hint="--region",
        )
    config = _outbox(ctx).config
    region = policy_region
    if region == "*" and config.region_name:
        region = config.region_name
    document = iam.policy(
        config, region=region, account=account, partition=partition, setup=setup
    )
    click.echo(json.dumps(document, indent=2))


for _command in (failed, retry, stats, create_table, check, iam_policy):
    outbox.add_command(_command)
    main.add_command(_command)


# -- output -------------------------------------------------------------------


def _when(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns; the last one is cut to the terminal's width."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    room = shutil.get_terminal_size((120, 24)).columns - sum(widths) - 2 * len(widths)
    room = max(room, 20)
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        last = row[-1] if len(row[-1]) <= room else row[-1][: room - 1] + "…"
        lines.append("  ".join([*cells, last]).rstrip())
    return "\n".join(lines)
