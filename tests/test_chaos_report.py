"""The chaos report's verdicts on hand-made records, without running any chaos."""

from __future__ import annotations

from typing import Any

from chaos.report import analyse

TIMEOUT = 10_000


def item(status: str, error: str = "") -> dict[str, Any]:
    """A final table item in ``status``."""
    found: dict[str, Any] = {"status": {"S": status}}
    if error:
        found["lastError"] = {"S": error}
    return found


def run(
    event_id: str,
    token: str,
    pid: int,
    t: int,
    *,
    ends: bool | None = True,
    outcome: str | None = "completed",
) -> list[dict[str, Any]]:
    """The records of one handler run: begin, start, maybe end and write-back."""
    common = {"id": event_id, "token": token, "pid": pid}
    records: list[dict[str, Any]] = [
        {"k": "begin", "t": t - 1, **common},
        {"k": "start", "t": t, "attempt": 1, **common},
    ]
    if ends is not None:
        records.append({"k": "end", "t": t + 1, "ok": ends, **common})
        if outcome is not None:
            records.append(
                {"k": "wb", "t": t + 2, "what": "x", "outcome": outcome, **common}
            )
    return records


def emitted(*ids: str, kind: str = "chaos.work") -> dict[str, Any]:
    """An emitter record for ``ids``."""
    return {
        "k": "emit",
        "ids": list(ids),
        "types": [kind] * len(ids),
        "t": 0,
        "pid": 9,
        "mode": "batch",
    }


class TestDuplicates:
    """Repeats after a planned failure are retries; others need an interruption."""

    def figures(self, *records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        flat = [emitted("e")] + [r for rs in records for r in rs]
        flat.extend(extra.get("more", []))
        return analyse(
            flat, {"e": item("completed")}, set(), skew_ms=0, timeout_ms=TIMEOUT
        )

    def test_retry_after_planned_failure_is_no_duplicate(self) -> None:
        """A handler that raised, then ran again, is a retry."""
        figures = self.figures(
            run("e", "a", 1, 100, ends=False, outcome="retrying"),
            run("e", "b", 1, 200),
        )
        assert figures["duplicate_invocations"] == 0
        assert figures["retries_after_planned_failure"] == 1
        assert figures["problems"] == []

    def test_killed_mid_task(self) -> None:
        """A run cut short by a kill explains the next one."""
        figures = self.figures(
            run("e", "a", 1, 100, ends=None),
            run("e", "b", 2, 20_000),
            more=[{"k": "kill", "victim": 1, "t": 150, "pid": 0}],
        )
        assert figures["duplicates_by_reason"] == {"killed mid-task": 1}
        assert figures["problems"] == []

    def test_killed_before_write_back(self) -> None:
        """A run killed after its handler returned explains the next one."""
        figures = self.figures(
            run("e", "a", 1, 100, outcome=None),
            run("e", "b", 2, 20_000),
            more=[{"k": "kill", "victim": 1, "t": 150, "pid": 0}],
        )
        assert figures["duplicates_by_reason"] == {"killed before write-back": 1}

    def test_stale_write_back(self) -> None:
        """A write-back that found another lease explains the next run."""
        figures = self.figures(
            run("e", "a", 1, 100, outcome="stale"), run("e", "b", 2, 20_000)
        )
        assert figures["duplicates_by_reason"] == {"lease expired before write-back": 1}
        assert figures["unexplained_duplicates"] == 0

    def test_live_write_back_then_a_run_is_unexplained(self) -> None:
        """A run after a completed write-back is a broken promise."""
        figures = self.figures(run("e", "a", 1, 100), run("e", "b", 2, 20_000))
        assert figures["unexplained_duplicates"] == 1
        assert figures["problems"]

    def test_run_under_a_second_live_lease_is_an_overlap(self) -> None:
        """A second run while the first lease was live counts as an overlap."""
        figures = self.figures(
            run("e", "a", 1, 100, ends=None),
            run("e", "b", 2, 200),
            more=[{"k": "kill", "victim": 1, "t": 150, "pid": 0}],
        )
        assert figures["overlapping_leases"] == 1
        assert figures["problems"]

    def test_a_lost_child_reported_by_the_main_process_ends_its_lease(
        self,
    ) -> None:
        """After the main process failed a killed run's attempt, a rerun is fine."""
        lost = {"k": "wb", "what": "lost attempt's failure", "id": "e"}
        lost |= {"token": "a", "pid": 7, "outcome": "retrying"}
        figures = self.figures(
            run("e", "a", 1, 100, ends=None),
            run("e", "b", 2, 300),
            more=[
                {"k": "kill", "victim": 1, "t": 150, "pid": 0},
                {**lost, "t": 160},
            ],
        )
        assert figures["duplicates_by_reason"] == {"killed mid-task": 1}
        assert figures["overlapping_leases"] == 0
        assert figures["problems"] == []
        # A rerun before the report is still an overlap.
        figures = self.figures(
            run("e", "a", 1, 100, ends=None),
            run("e", "b", 2, 300),
            more=[
                {"k": "kill", "victim": 1, "t": 150, "pid": 0},
                {**lost, "t": 400},
            ],
        )
        assert figures["overlapping_leases"] == 1

    def test_a_lost_report_after_a_buffered_completion_ends_its_lease(
        self,
    ) -> None:
        """A child killed between buffering its completion and handing Celery
        the result is reported lost; that report ends the lease."""
        lost = {"k": "wb", "what": "lost attempt's failure", "id": "e"}
        lost |= {"token": "a", "pid": 7, "t": 160}
        records = [
            run("e", "a", 1, 100, outcome="buffered"),
            run("e", "b", 2, 300),
        ]
        kill = {"k": "kill", "victim": 1, "t": 150, "pid": 0}
        figures = self.figures(*records, more=[kill, {**lost, "outcome": "retrying"}])
        assert figures["duplicates_by_reason"] == {
            "killed before its buffered write-back": 1
        }
        assert figures["overlapping_leases"] == 0
        # A report DynamoDB refused ended nothing: the rerun overlaps.
        figures = self.figures(*records, more=[kill, {**lost, "outcome": "stale"}])
        assert figures["overlapping_leases"] == 1

    def test_a_buffered_completion_lost_with_its_process(self) -> None:
        """A killed process's buffered completion explains a rerun, same lease."""
        figures = self.figures(
            run("e", "a", 1, 100, outcome="buffered"),
            run("e", "a", 2, 20_000),
            more=[{"k": "kill", "victim": 1, "t": 150, "pid": 0}],
        )
        assert figures["duplicates_by_reason"] == {
            "killed before its buffered write-back": 1
        }
        assert figures["problems"] == []
        # Without a kill, a lost buffered completion is unexplained.
        figures = self.figures(
            run("e", "a", 1, 100, outcome="buffered"), run("e", "a", 2, 20_000)
        )
        assert figures["unexplained_duplicates"] == 1

    def test_skew_widens_the_window(self) -> None:
        """A drainer running ahead may reclaim that much before the deadline."""
        records = [
            emitted("e"),
            *run("e", "a", 1, 100, ends=None),
            *run("e", "b", 2, 8_000),
            {"k": "kill", "victim": 1, "t": 150, "pid": 0},
        ]
        table = {"e": item("completed")}
        assert (
            analyse(records, table, set(), skew_ms=0, timeout_ms=TIMEOUT)[
                "overlapping_leases"
            ]
            == 1
        )
        assert (
            analyse(records, table, set(), skew_ms=3000, timeout_ms=TIMEOUT)[
                "overlapping_leases"
            ]
            == 0
        )


class TestOutcomes:
    """Lost, pending and failed events are counted from the final table."""

    def test_missing_and_unhandled_completions_are_lost(self) -> None:
        """An event missing from the table, or completed unhandled, is lost."""
        records = [emitted("a", "b", "c"), *run("c", "t", 1, 100)]
        table = {"b": item("completed"), "c": item("completed")}
        figures = analyse(records, table, set(), skew_ms=0, timeout_ms=TIMEOUT)
        assert figures["lost"] == 2
        assert figures["completed"] == 2

    def test_failed_without_running_is_a_problem(self) -> None:
        """Failing an event whose handler never ran breaks a promise."""
        records = [emitted("a")]
        figures = analyse(
            records,
            {"a": item("failed", "LeaseExpired: x")},
            set(),
            skew_ms=0,
            timeout_ms=TIMEOUT,
        )
        assert figures["failed_without_running"] == 1
        assert figures["failed_by_error"] == {"LeaseExpired": 1}
        assert figures["problems"]

    def test_pending_and_torn_orders(self) -> None:
        """Pending events and orders without their event are reported."""
        order = {
            "k": "emit",
            "ids": ["o"],
            "types": ["chaos.work"],
            "t": 0,
            "pid": 9,
            "mode": "order",
        }
        figures = analyse(
            [order], {"o": item("active")}, {"order-x"}, skew_ms=0, timeout_ms=TIMEOUT
        )
        assert figures["pending"] == 1
        assert len(figures["problems"]) == 2

    def test_a_pending_event_is_told_with_its_item_and_records(self) -> None:
        """The problem names the stuck event, its final state and its history."""
        stuck = item("active") | {"leaseToken": {"S": "t1"}}
        records = [emitted("e"), *run("e", "t1", 5, 100, ends=None)]
        figures = analyse(records, {"e": stuck}, set(), skew_ms=0, timeout_ms=TIMEOUT)
        (problem,) = figures["problems"]
        assert problem.startswith("1 events still pending at the end: e ")
        assert "'leaseToken': 't1'" in problem
        assert "begin@99/5 token=t1" in problem
        assert "start@100/5 token=t1" in problem

    def test_emit_error_stored_anyway_is_expected(self) -> None:
        """An emit that raised but was written is an event like the others."""
        records = [
            {
                "k": "emit-error",
                "ids": ["a"],
                "t": 0,
                "pid": 9,
                "mode": "put",
                "error": "x",
            },
            *run("a", "t", 1, 100),
        ]
        figures = analyse(
            records, {"a": item("completed")}, set(), skew_ms=0, timeout_ms=TIMEOUT
        )
        assert figures["emit_errors_stored_anyway"] == 1
        assert figures["lost"] == 0 and figures["problems"] == []


def test_a_deferred_start_keeps_only_the_claims_deadline() -> None:
    """With a deferred start mark, a run after the claim's deadline is no overlap."""
    first = run("e", "a", 1, 100, outcome="buffered")
    first[0]["deferred"] = True
    first[1]["deadline"] = 5_000  # sooner than began + TIMEOUT
    records = [emitted("e"), *first, *run("e", "b", 2, 5_100)]
    records.append({"k": "kill", "victim": 1, "t": 150, "pid": 0})
    figures = analyse(
        records, {"e": item("completed")}, set(), skew_ms=0, timeout_ms=TIMEOUT
    )
    assert figures["overlapping_leases"] == 0
    first[0]["deferred"] = False  # a written start renews the whole lease
    figures = analyse(
        records, {"e": item("completed")}, set(), skew_ms=0, timeout_ms=TIMEOUT
    )
    assert figures["overlapping_leases"] == 1


def test_a_deferred_mark_may_end_a_skewed_claims_lease_sooner() -> None:
    """A mark restarts the lease by the worker's clock, maybe before the claim's."""
    first = run("e", "a", 1, 100, outcome="buffered")
    first[0]["deferred"] = True
    first[1]["deadline"] = 50_000  # claimed by a drainer whose clock runs ahead
    records = [emitted("e"), *first, *run("e", "b", 2, 100 + TIMEOUT)]
    records.append({"k": "kill", "victim": 1, "t": 150, "pid": 0})
    figures = analyse(
        records, {"e": item("completed")}, set(), skew_ms=0, timeout_ms=TIMEOUT
    )
    assert figures["overlapping_leases"] == 0
