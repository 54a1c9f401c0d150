"""`sendsystem check`'s judgement (pure): facts + thresholds -> status and one line."""

from __future__ import annotations

import pytest

from sendsystem.config import CheckConfig
from sendsystem.monitoring import (
    CRITICAL,
    OK,
    WARNING,
    Facts,
    LastFinished,
    Running,
    Worker,
    evaluate,
)

T = CheckConfig()
LIVE = {"sort": True, "send": True}


def w(name: str, *, alive: bool = True, state: str = "running", enabled: bool = True) -> Worker:
    return Worker(name, "h1", "send", state, enabled, alive)


def test_all_well_is_ok_with_perfdata() -> None:
    r = evaluate(Facts(LIVE, [w("a"), w("b")]), T)
    assert r.status == OK
    assert r.line.startswith("SENDSYSTEM OK - ")
    _summary, perf = r.line.split(" | ")
    assert "\n" not in r.line
    assert "workers_alive=2" in perf.split()
    assert "complaint_rate=0.000%;0.1;0.3;0;100" in perf.split()


def test_missing_balancer_is_critical_and_listed_first() -> None:
    r = evaluate(Facts({"sort": True, "send": False}, [w("a", alive=False)]), T)
    assert r.status == CRITICAL
    assert r.line.startswith("SENDSYSTEM CRITICAL - no live send balancer; 1 dead worker")


def test_stopped_worker_is_not_dead_but_disabled_warns() -> None:
    assert evaluate(Facts(LIVE, [w("a", alive=False, state="stopped")]), T).status == OK
    r = evaluate(Facts(LIVE, [w("a", enabled=False)]), T)
    assert r.status == WARNING and "disabled worker" in r.line


def test_stall_needs_pending_work_and_the_full_quiet_time() -> None:
    quiet = T.stall_minutes * 60
    assert evaluate(Facts(LIVE, running=[Running(1, 5, quiet - 1)]), T).status == OK
    assert evaluate(Facts(LIVE, running=[Running(1, 0, quiet * 10)]), T).status == OK
    r = evaluate(Facts(LIVE, running=[Running(1, 5, quiet)]), T)
    assert r.status == CRITICAL and "newsletter 1 stalled" in r.line and "stalled=1;;1" in r.line


def test_deferred_backlog_age() -> None:
    limit = T.deferred_minutes * 60
    assert evaluate(Facts(LIVE, deferred=3, deferred_oldest_seconds=limit - 1), T).status == OK
    assert evaluate(Facts(LIVE, deferred=3, deferred_oldest_seconds=limit), T).status == WARNING


@pytest.mark.parametrize(("complaints", "bounces", "status"), [
    (0, 0, OK), (9, 0, OK), (10, 0, WARNING), (29, 0, WARNING), (30, 0, CRITICAL),
    (0, 199, OK), (0, 200, WARNING), (0, 500, CRITICAL), (30, 200, CRITICAL),
])
def test_rate_thresholds_gmail_yahoo_and_ses_defaults(complaints: int, bounces: int,
                                                      status: int) -> None:
    last = LastFinished(7, 10_000, bounces, complaints)
    assert evaluate(Facts(LIVE, last=last), T).status == status


def test_small_newsletters_are_not_judged() -> None:
    last = LastFinished(7, T.min_delivered - 1, 50, 50)
    assert evaluate(Facts(LIVE, last=last), T).status == OK


def test_grafana_dashboard_uses_only_exported_metric_names() -> None:
    import json
    import re
    from pathlib import Path

    import sendsystem.monitoring as mon

    source = Path(mon.__file__).read_text(encoding="utf-8")
    exported = {f"sendsystem_{n}" for n in re.findall(r'f"\{PREFIX\}_(\w+)"', source)}
    dash = json.loads((Path(__file__).parents[2] / "contrib" / "grafana" /
                       "sendsystem.json").read_text(encoding="utf-8"))
    used = {m for p in dash["panels"] for t in p["targets"]
            for m in re.findall(r"sendsystem_\w+", t["expr"])}
    assert used
    # Counters are exposed with _total.
    assert used <= exported | {f"{n}_total" for n in exported}, used - exported
