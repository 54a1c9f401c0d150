"""State names and the two rules that read them (sendsystem/states.py): pure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sendsystem.states import (
    FINAL_MESSAGE_STATES,
    MESSAGE_STATES,
    SEND_PENDING,
    SORT_PENDING,
    BatchState,
    MessageState,
    NewsletterState,
    SubscriberStatus,
    WorkerState,
    skip_reason,
    worker_alive,
    worker_dead,
)

MIGRATION = Path(__file__).parents[2] / "sendsystem" / "sql" / "migrations" / "001_initial.sql"


def _enum_values(table: str, column: str) -> list[str]:
    sql = MIGRATION.read_text()
    body = sql[sql.index(f"CREATE TABLE IF NOT EXISTS {table}"):]
    m = re.search(rf"\n\s*{column}\s+ENUM\(([^)]*)\)", body)
    assert m, (table, column)
    return re.findall(r"'([^']*)'", m.group(1))


@pytest.mark.parametrize(("enum", "table", "column"), [
    (MessageState, "messages", "state"),
    (WorkerState, "workers", "state"),
    (BatchState, "batches", "state"),
    (NewsletterState, "newsletters", "state"),
    (SubscriberStatus, "subscribers", "status"),
])
def test_values_are_the_database_enum_values(enum: type, table: str, column: str) -> None:
    assert [m.value for m in enum] == _enum_values(table, column)


def test_a_row_value_compares_equal_to_its_member() -> None:
    assert MessageState.SENT == "sent" and "sent" in FINAL_MESSAGE_STATES
    assert {"sent": 1}[MessageState.SENT] == 1 and f"{MessageState.SENT}" == "sent"


def test_sets() -> None:
    assert tuple(MessageState) == MESSAGE_STATES
    assert {"sent", "failed", "skipped", "bounced", "cancelled"} == FINAL_MESSAGE_STATES
    assert SORT_PENDING == ("queued",)
    assert SEND_PENDING == ("queued", "merged", "deferred")
    assert not FINAL_MESSAGE_STATES & set(SEND_PENDING)


@pytest.mark.parametrize(("status", "blocked", "reason"), [
    ("active", 0, None),
    ("active", 1, "address or domain blocked"),
    ("unsubscribed", 0, "subscriber unsubscribed"),
    ("bounced", 1, "subscriber bounced"),
    ("complained", 0, "subscriber complained"),
])
def test_skip_reason(status: str, blocked: int, reason: str | None) -> None:
    assert skip_reason(status, blocked) == reason


@pytest.mark.parametrize(("state", "age", "alive"), [
    ("running", 0.0, True),
    ("running", 10.0, True),        # exactly the timeout: still alive
    ("running", 10.001, False),
    ("standby", 3.0, True),
    ("stopping", 3.0, True),
    ("starting", None, False),      # never heartbeated
    ("stopped", 0.0, False),        # said it stopped: not alive, however fresh
])
def test_worker_alive(state: str, age: float | None, alive: bool) -> None:
    assert worker_alive(state, age, 10.0) is alive


def test_worker_alive_takes_database_decimals() -> None:
    from decimal import Decimal
    assert worker_alive("running", Decimal("9.999999"), 10.0)  # type: ignore[arg-type]


def test_worker_dead_is_silent_not_stopped() -> None:
    assert worker_dead("running", alive=False)
    assert not worker_dead("running", alive=True)
    assert not worker_dead("stopped", alive=False)
