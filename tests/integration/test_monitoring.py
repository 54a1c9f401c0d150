"""`sendsystem metrics` and `sendsystem check` against a real MariaDB, as subprocesses.

Each condition is built with SQL (worker rows, a lease, message states,
bounces), then the real command reads it: metrics through a real HTTP scrape
parsed with prometheus_client's own parser, check through its exit code.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.env import Env
from tests.harness.helpers import make_newsletter, sql


def add_worker(env: Env, name: str, role: str, *, age: float = 0.0, state: str = "running",
               enabled: int = 1, rate: float = 0.0, backlog: int = 0) -> int:
    sql(env, "INSERT INTO workers (host, role, name, pid, state, enabled, started_at, "
        "heartbeat_at, rate, backlog) VALUES ('h1', %s, %s, 1, %s, %s, NOW(6), "
        "TIMESTAMPADD(MICROSECOND, %s, NOW(6)), %s, %s)",
        (role, name, state, enabled, -int(age * 1e6), rate, backlog))
    return int(sql(env, "SELECT id FROM workers WHERE name = %s AND role = %s",
                   (name, role))[0]["id"])


def hold_lease(env: Env, kind: str, worker: int) -> None:
    sql(env, "UPDATE leases SET holder = %s, epoch = epoch + 1, taken_at = NOW(6), "
        "expires_at = TIMESTAMPADD(SECOND, 60, NOW(6)) WHERE kind = %s", (worker, kind))


# A live worker's last heartbeat, in seconds: 10 minutes ahead, standing in for
# one that keeps heartbeating. A heartbeat of "now" turned dead after the
# 3-second heartbeat_timeout whenever a test's several `check` subprocesses
# took longer than that on a loaded machine (a flaky test, seen under load).
LIVE = -600.0


def healthy(env: Env) -> None:
    """Both balancers live and holding their leases, one worker of each kind."""
    hold_lease(env, "sort", add_worker(env, "sb1", "sort-balancer", age=LIVE))
    hold_lease(env, "send", add_worker(env, "db1", "send-balancer", age=LIVE))
    add_worker(env, "s1", "sort", rate=12.5, backlog=40, age=LIVE)
    add_worker(env, "d1", "send", rate=30.0, backlog=7, age=LIVE)


def running_newsletter(env: Env, n: int = 10) -> int:
    nid = make_newsletter(env, n)
    # enqueue released it: its n queued message rows (and their kept counts) exist.
    sql(env, "UPDATE newsletters SET state = 'running', released_at = NOW(6), total = %s "
        "WHERE id = %s", (n, nid))
    return nid


def set_states(env: Env, nid: int, state: str, count: int, extra: str = "") -> None:
    sql(env, f"UPDATE messages SET state = %s{extra} WHERE newsletter_id = %s AND state = "
        "'queued' ORDER BY id LIMIT %s", (state, nid, count))


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(fams: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
          ) -> float:
    found = [v for lab, v in fams[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, fams.get(name))
    return found[0]


def test_serve_scrape_reads_the_database(env: Env) -> None:
    healthy(env)
    add_worker(env, "d2", "send", age=60)  # dead: heartbeat far past the 3 s timeout
    nid = running_newsletter(env, 10)
    set_states(env, nid, "sent", 4, ", finished_at = NOW(6), deferrals = 2")
    set_states(env, nid, "merged", 3, ", merged_at = NOW(6)")
    sql(env, "INSERT INTO bounces (newsletter_id, kind, verified) VALUES "
        "(%s, 'complaint', 1), (%s, 'hard', 1), (%s, 'hard', 0)", (nid, nid, nid))
    proc = subprocess.Popen([sys.executable, "-m", "sendsystem", "--config", str(env.path),
                             "metrics", "--serve", "127.0.0.1:0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        while "serving metrics on" not in line:
            line = proc.stderr.readline()
            assert line, "metrics --serve ended before serving"
        url = line.split("serving metrics on ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        # A second scrape reads the database again: a new message state shows.
        set_states(env, nid, "failed", 1, ", finished_at = NOW(6)")
        with urllib.request.urlopen(url, timeout=10) as response:
            again = families(response.read().decode())
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    fams = families(text)
    assert value(fams, "sendsystem_up") == 1
    assert value(fams, "sendsystem_workers", role="send", state="running") == 1
    assert value(fams, "sendsystem_workers", role="send", state="dead") == 1
    assert value(fams, "sendsystem_worker_up", worker="d2", role="send", host="h1") == 0
    assert value(fams, "sendsystem_worker_rate", worker="s1", role="sort") == 12.5
    assert value(fams, "sendsystem_worker_backlog", worker="d1", role="send") == 7
    assert value(fams, "sendsystem_worker_heartbeat_age_seconds", worker="d2") >= 59
    assert value(fams, "sendsystem_balancer_lease_holder", kind="send", worker="db1") == 1
    assert value(fams, "sendsystem_balancer_live", kind="sort") == 1
    m = "sendsystem_newsletter_messages"
    assert value(fams, m, newsletter=str(nid), state="sent") == 4
    assert value(fams, m, newsletter=str(nid), state="merged") == 3
    assert value(fams, m, newsletter=str(nid), state="queued") == 3
    assert value(fams, "sendsystem_deliveries_total", outcome="sent") == 4
    assert value(fams, "sendsystem_deferrals_total") == 8
    assert value(fams, "sendsystem_bounces_total", kind="hard") == 1
    assert value(fams, "sendsystem_bounces_total", kind="complaint") == 1
    assert value(fams, "sendsystem_unverified_reports_total", kind="hard") == 1
    assert value(fams, "sendsystem_relay_health", relay="127.0.0.1:2525", health="unknown") == 1
    assert value(again, "sendsystem_deliveries_total", outcome="failed") == 1
    assert value(again, m, newsletter=str(nid), state="failed") == 1
    # Bounded cardinality: no label anywhere names a recipient.
    assert "@" not in text


def test_newsletters_only_while_running(env: Env) -> None:
    nid = running_newsletter(env, 3)
    sql(env, "UPDATE newsletters SET state = 'done' WHERE id = %s", (nid,))
    code, out, err = env.cli("metrics")
    assert code == 0, err
    fams = families(out)
    assert not fams.get("sendsystem_newsletter_messages")
    assert value(fams, "sendsystem_balancer_live", kind="send") == 0


def test_textfile_is_written_atomically(env: Env, tmp_path: Path) -> None:
    healthy(env)
    target = tmp_path / "prom" / "sendsystem.prom"
    target.parent.mkdir()
    target.write_text("old contents\n")
    code, _out, err = env.cli("metrics", "--textfile", str(target))
    assert code == 0, err
    # Only the final file is left (the temporary one was renamed onto it) and it parses.
    assert [p.name for p in target.parent.iterdir()] == ["sendsystem.prom"]
    fams = families(target.read_text())
    assert value(fams, "sendsystem_workers", role="sort-balancer", state="running") == 1
    # A failing write leaves the previous file whole: an unwritable directory.
    target.parent.chmod(0o500)
    try:
        code, _out, _err = env.cli("metrics", "--textfile", str(target))
    finally:
        target.parent.chmod(0o700)
    if code != 0:  # root may write anyway; then the new file is whole too
        assert families(target.read_text())
        assert [p.name for p in target.parent.iterdir()] == ["sendsystem.prom"]


def run_check(env: Env, *args: str) -> tuple[int, str]:
    code, out, err = env.cli("check", *args)
    assert out.count("\n") == 1, (out, err)
    return code, out.strip()


def test_check_ok(env: Env) -> None:
    healthy(env)
    code, line = run_check(env)
    assert code == 0, line
    assert line.startswith("SENDSYSTEM OK - ") and " | " in line and "bounce_rate=" in line


@pytest.mark.parametrize("kind", ["sort", "send"])
def test_check_no_live_balancer_is_critical(env: Env, kind: str) -> None:
    healthy(env)
    # The lease is held, but by a balancer whose heartbeat is long gone.
    sql(env, "UPDATE workers SET heartbeat_at = TIMESTAMPADD(MINUTE, -5, NOW(6)) "
        "WHERE role = %s", (f"{kind}-balancer",))
    code, line = run_check(env)
    assert code == 2 and f"no live {kind} balancer" in line, line


def test_check_dead_or_disabled_worker_warns(env: Env) -> None:
    healthy(env)
    add_worker(env, "d9", "send", age=120)
    code, line = run_check(env)
    assert code == 1 and "dead worker" in line and "d9@h1" in line, line
    sql(env, "UPDATE workers SET heartbeat_at = TIMESTAMPADD(MINUTE, 10, NOW(6)), enabled = 0 "
        "WHERE name = 'd9'")
    code, line = run_check(env)
    assert code == 1 and "disabled worker" in line, line


def test_check_stalled_newsletter_is_critical(env: Env) -> None:
    healthy(env)
    nid = running_newsletter(env, 5)
    sql(env, "UPDATE newsletters SET released_at = TIMESTAMPADD(MINUTE, -20, NOW(6)) "
        "WHERE id = %s", (nid,))
    code, line = run_check(env)
    assert code == 2 and f"newsletter {nid} stalled" in line, line
    # Within the threshold (an option overrides [check] stall_minutes): fine.
    code, line = run_check(env, "--stall-minutes", "30")
    assert code == 0, line
    # Progress a minute ago (a send worker's outcome): not stalled.
    set_states(env, nid, "sent", 1, ", finished_at = TIMESTAMPADD(MINUTE, -1, NOW(6)), "
               "send_worker_id = (SELECT id FROM workers WHERE name = 'd1')")
    code, line = run_check(env)
    assert code == 0, line


def test_check_old_deferred_backlog_warns(env: Env) -> None:
    healthy(env)
    nid = running_newsletter(env, 5)
    set_states(env, nid, "sent", 3, ", finished_at = NOW(6)")
    set_states(env, nid, "deferred", 2, ", merged_at = TIMESTAMPADD(MINUTE, -90, NOW(6)), "
               "next_attempt_at = TIMESTAMPADD(MINUTE, 10, NOW(6))")
    code, line = run_check(env)
    assert code == 1 and "2 deferred, oldest waiting 90 min" in line, line
    code, line = run_check(env, "--deferred-minutes", "120")
    assert code == 0, line


@pytest.mark.parametrize(("complaints", "hard", "status"), [
    (0, 0, 0), (2, 0, 1), (3, 0, 2), (0, 20, 1), (0, 50, 2)])
def test_check_rates_of_last_finished_newsletter(env: Env, complaints: int, hard: int,
                                                 status: int) -> None:
    healthy(env)
    nid = running_newsletter(env, 1000)
    sql(env, "UPDATE newsletters SET state = 'done', finished_at = NOW(6) WHERE id = %s",
        (nid,))
    sql(env, "UPDATE messages SET state = 'sent', finished_at = NOW(6) WHERE newsletter_id = %s",
        (nid,))
    for kind, n in (("complaint", complaints), ("hard", hard)):
        for _ in range(n):
            sql(env, "INSERT INTO bounces (newsletter_id, kind, verified) VALUES (%s, %s, 1)",
                (nid, kind))
    # Unverified reports change nothing, here either.
    sql(env, "INSERT INTO bounces (newsletter_id, kind, verified) VALUES (%s, 'complaint', 0)",
        (nid,))
    code, line = run_check(env)
    assert code == status, line
    if complaints:
        assert "complaint rate" in line
    if hard:
        assert "bounce rate" in line


def test_check_database_unreachable_is_critical(env: Env) -> None:
    env.configure(database={"host": "127.0.0.1", "port": 1})
    code, line = run_check(env)
    assert code == 2 and "database unreachable" in line, line


def test_check_bad_threshold_is_unknown(env: Env) -> None:
    code, line = run_check(env, "--bounce-warn", "9", "--bounce-crit", "5")
    assert code == 3 and line.startswith("SENDSYSTEM UNKNOWN"), line


