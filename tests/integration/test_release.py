"""Releasing a newsletter in chunks (sendsystem/release.py) against a real MariaDB:
slices, the lease between two releasers, a takeover after a crash, a cancel
half-way, and a real `sendsystem enqueue` killed mid-release and finished by a
real sort balancer."""

from __future__ import annotations

import signal
import time

import pytest

from sendsystem import admin, release
from tests.harness.env import Env
from tests.harness.helpers import sql, wait_exit, wait_for

HTML = "<p>Hej {{ first_name }}</p>"


def scheduled(env: Env, n: int, *, unsubscribed: int = 0) -> tuple[int, int]:
    """A list of n subscribers (ids spread over 2n: every other id is another list's)
    and a newsletter on it that is not released yet; (newsletter id, list id)."""
    a = admin.create_list(env.db, "news", "Nyheder <news@example.com>")
    b = admin.create_list(env.db, "other", "Andet <other@example.com>")
    sql(env, "INSERT INTO subscribers (list_id, email, domain, fields) "
             "SELECT IF(seq %% 2, %s, %s), CONCAT('u', seq, '@example.com'), 'example.com', '{}' "
             "FROM seq_1_to_" + str(2 * n), (a, b))
    if unsubscribed:
        sql(env, "UPDATE subscribers SET status = 'unsubscribed' WHERE list_id = %s "
                 "ORDER BY id LIMIT " + str(unsubscribed), (a,))
    html = env.tmp / "t.html"
    html.write_text(HTML, encoding="utf-8")
    admin.add_template(env.db, "t", "Hej", html, None)
    nid, created = admin.enqueue(env.db, "news", "t", at="2999-01-01 09:00")
    assert created == 0
    return nid, a


def newsletter(env: Env, nid: int) -> dict[str, object]:
    return sql(env, "SELECT state, total, release_next, release_holder FROM newsletters "
                    "WHERE id = %s", (nid,))[0]


def message_count(env: Env, nid: int) -> int:
    return int(sql(env, "SELECT COUNT(*) AS n FROM messages WHERE newsletter_id = %s",
                   (nid,))[0]["n"])


def test_release_in_slices_under_one_lease(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    nid, list_id = scheduled(env, 100, unsubscribed=3)
    monkeypatch.setattr(release, "RELEASE_CHUNK", 40)  # ids 1..199: 5 chunks
    first = release.release(env.db, nid, list_id, holder="a", budget=0)
    assert (first.done, first.created, first.total) == (False, 17, 17)  # ids 1-40, 3 left
    nl = newsletter(env, nid)
    assert (nl["state"], nl["release_holder"], nl["total"]) == ("scheduled", "a", 17)
    # The lease is a's: b gets nothing done and changes nothing.
    other = release.release(env.db, nid, list_id, holder="b")
    assert (other.done, other.created) == (False, 0)
    assert message_count(env, nid) == 17
    rest = release.release(env.db, nid, list_id, holder="a")
    assert (rest.done, rest.created, rest.total) == (True, 80, 97)
    nl = newsletter(env, nid)
    assert (nl["state"], nl["total"], nl["release_holder"]) == ("running", 97, None)
    assert message_count(env, nid) == 97
    # Released is released: nothing more, for anyone.
    again = release.release(env.db, nid, list_id, holder="b")
    assert (again.done, again.created, again.total) == (True, 0, 97)


def test_a_dead_releasers_work_is_taken_over_from_its_cursor(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    nid, list_id = scheduled(env, 100)
    monkeypatch.setattr(release, "RELEASE_CHUNK", 50)
    release.release(env.db, nid, list_id, holder="dead", budget=0, lease=0.2)
    assert message_count(env, nid) == 25
    time.sleep(0.3)  # its lease runs out
    taken = release.release(env.db, nid, list_id, holder="heir")
    assert (taken.done, taken.created, taken.total) == (True, 75, 100)
    # The dead one coming back finds it released and creates nothing.
    late = release.release(env.db, nid, list_id, holder="dead")
    assert (late.done, late.created) == (True, 0)
    assert message_count(env, nid) == 100
    dupes = sql(env, "SELECT subscriber_id FROM messages WHERE newsletter_id = %s "
                     "GROUP BY subscriber_id HAVING COUNT(*) > 1", (nid,))
    assert dupes == []


def test_cancel_half_way_stops_the_release(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    nid, list_id = scheduled(env, 100)
    monkeypatch.setattr(release, "RELEASE_CHUNK", 50)
    release.release(env.db, nid, list_id, holder="a", budget=0)
    assert admin.cancel(env.db, nid) == 25
    result = release.release(env.db, nid, list_id, holder="a")
    assert (result.done, result.created) == (True, 0)
    assert newsletter(env, nid)["state"] == "cancelled"
    assert message_count(env, nid) == 25


def test_killed_enqueue_is_finished_by_the_sort_balancer(env: Env) -> None:
    """SIGKILL `sendsystem enqueue` mid-release: the newsletter stays scheduled (no
    balancer hands out a half-released newsletter); a real sort balancer takes over
    once the lease runs out and every active subscriber gets exactly one message."""
    n = 300_000
    a = admin.create_list(env.db, "news", "Nyheder <news@example.com>")
    sql(env, "INSERT INTO subscribers (list_id, email, domain, fields) "
             "SELECT %s, CONCAT('u', seq, '@example.com'), 'example.com', '{}' "
             "FROM seq_1_to_" + str(n), (a,))
    html = env.tmp / "t.html"
    html.write_text(HTML, encoding="utf-8")
    admin.add_template(env.db, "t", "Hej", html, None)
    proc = env.spawn("enqueue", "--list", "news", "--template", "t", log_name="enqueue")
    wait_for(lambda: sql(env, "SELECT total FROM newsletters WHERE total > 0"), 60,
             "the first chunk", interval=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    nl = sql(env, "SELECT id, state, total, release_holder FROM newsletters")[0]
    assert nl["state"] == "scheduled" and 0 < nl["total"] < n, nl
    assert str(nl["release_holder"]).startswith("enqueue:")
    assert message_count(env, nl["id"]) == nl["total"]
    # The lease (30 s) runs out; we move its end instead of waiting for it.
    sql(env, "UPDATE newsletters SET release_until = NOW(6) - INTERVAL 1 SECOND")
    balancer = env.spawn("sort-balancer", "--name", "b")
    try:
        wait_for(lambda: newsletter(env, nl["id"])["state"] == "running", 120,
                 "the balancer to finish the release")
    finally:
        balancer.send_signal(signal.SIGTERM)
        assert wait_exit(balancer, 30) == 0
    assert newsletter(env, nl["id"])["total"] == n
    assert message_count(env, nl["id"]) == n
    assert "Traceback" not in (env.tmp / "sort-balancer.log").read_text()
