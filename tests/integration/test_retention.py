"""`sendsystem purge` on a real database after a real send: the stats (text, JSON,
HTML) of a purged newsletter equal those from before; running and recent
newsletters, subscribers and lists are untouched; --dry-run changes nothing;
the deletes go in chunks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sendsystem import admin, retention
from tests.harness.env import Env
from tests.harness.helpers import make_newsletter, sql, states
from tests.harness.smtp_server import SmtpServer
from tests.integration.test_sending import relay_config, run_pipeline_once


def _sent_newsletter(env: Env, list_name: str, n: int) -> int:
    """A newsletter sent for real: some delivered, some refused (replies and failures)."""
    with SmtpServer() as srv:
        relay_config(env, srv)
        srv.rule("user1@example.com", "550 5.1.1 <user1@example.com>: User unknown")
        srv.rule("user2@example.com", "554 5.7.1 Message rejected by policy")
        nid = make_newsletter(env, n, list_name=list_name)
        run_pipeline_once(env)
    assert admin.get_newsletter(env.db, nid)["state"] == "done"
    return nid


def _age(env: Env, nid: int, days: int) -> None:
    sql(env, "UPDATE newsletters SET finished_at = TIMESTAMPADD(DAY, -%s, NOW(6)) "
             "WHERE id = %s", (days, nid))


def _bounce(env: Env, nid: int, kind: str, verified: int, days_ago: int) -> None:
    sql(env, "INSERT INTO bounces (newsletter_id, email, kind, verified, received_at) "
             "VALUES (%s, 'x@example.com', %s, %s, TIMESTAMPADD(DAY, -%s, NOW(6)))",
        (nid, kind, verified, days_ago))


def _report(env: Env, nid: int) -> tuple[dict[str, Any], str, str]:
    html = env.tmp / f"report-{nid}.html"
    code, out, err = env.cli("stats", str(nid), "--json")
    assert code == 0, err
    facts = json.loads(out)
    code, text, err = env.cli("stats", str(nid), "--html", str(html))
    assert code == 0, err
    return facts, text.replace(str(html), "HTML"), html.read_text(encoding="utf-8")


def _rows(env: Env, table: str, nid: int) -> int:
    return int(sql(env, f"SELECT COUNT(*) AS n FROM {table} WHERE newsletter_id = %s",
                   (nid,))[0]["n"])


def _delivery_counters(env: Env) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    code, out, err = env.cli("metrics")
    assert code == 0, err
    found = {}
    for family in text_string_to_metric_families(out):
        if family.name in ("sendsystem_deliveries", "sendsystem_deferrals"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[f"{sample.name}{sorted(sample.labels.items())}"] = sample.value
    assert found
    return found


def test_purge_keeps_stats_and_touches_only_old_finished_newsletters(env: Env) -> None:
    old = _sent_newsletter(env, "old", 12)
    recent = _sent_newsletter(env, "recent", 5)
    _age(env, old, 100)
    _age(env, recent, 30)
    # The SMTP-time hard bounce of user1 was recorded just now: make it as old as its send.
    sql(env, "UPDATE bounces SET received_at = TIMESTAMPADD(DAY, -99, NOW(6)) "
             "WHERE newsletter_id = %s", (old,))
    for kind, verified in (("hard", 1), ("soft", 1), ("blocked", 1), ("complaint", 1),
                           ("hard", 0), ("complaint", 0)):
        _bounce(env, old, kind, verified, 95)
    running = make_newsletter(env, 4, list_name="live")  # enqueued, never sent
    sql(env, "UPDATE newsletters SET state = 'running', released_at = NOW(6) WHERE id = %s",
        (running,))
    before = {nid: _report(env, nid) for nid in (old, recent)}
    facts = before[old][0]
    assert facts["counts"]["sent"] == 10 and facts["counts"]["failed"] == 2
    assert facts["bounces"]["blocked"] == 1 and facts["bounces"]["unverified"] == 2
    assert facts["replies"] and facts["failures"] and facts["timeline"] and facts["workers"]
    subscribers = sql(env, "SELECT COUNT(*) AS n FROM subscribers")[0]["n"]
    old_bounces = _rows(env, "bounces", old)
    deliveries_before = _delivery_counters(env)

    code, out, err = env.cli("purge", "--older-than", "90d", "--dry-run")
    assert code == 0, err
    assert f"would purge newsletter {old} (done" in out and "12 messages" in out
    assert f"newsletter {recent}" not in out and "nothing was changed" in out
    assert _rows(env, "messages", old) == 12 and _rows(env, "bounces", old) == old_bounces
    assert sql(env, "SELECT COUNT(*) AS n FROM newsletter_summaries")[0]["n"] == 0

    code, out, err = env.cli("purge", "--older-than", "90d", "--chunk-size", "5",
                             "--pause", "0")
    assert code == 0, err
    assert f"purged newsletter {old}" in out and "12 messages" in out
    assert _rows(env, "messages", old) == 0
    # Prometheus counters must not drop when rows go (a drop reads as a reset).
    assert _delivery_counters(env) == deliveries_before
    assert _rows(env, "bounces", old) == 0 < old_bounces
    # Recent and running newsletters, subscribers and lists are untouched.
    assert states(env, recent) == {"sent": 3, "failed": 2}
    assert states(env, running) == {"queued": 4}
    assert sql(env, "SELECT COUNT(*) AS n FROM subscribers")[0]["n"] == subscribers

    after_facts, after_text, after_html = _report(env, old)
    assert after_facts.pop("purged_at") is not None
    assert facts.pop("purged_at") is None
    assert after_facts == facts
    assert after_text == before[old][1]
    assert after_html == before[old][2]
    assert _report(env, recent) == before[recent]

    # Purging again finds nothing new.
    code, out, err = env.cli("purge", "--older-than", "90d")
    assert code == 0 and "purged 0 newsletter(s)" in out, (out, err)


def test_late_bounce_adds_on_top_and_a_later_purge_folds_it_once(env: Env) -> None:
    nid = _sent_newsletter(env, "old", 4)
    _age(env, nid, 100)
    _bounce(env, nid, "hard", 1, 95)
    options = retention.Options(older_than=90 * 86400, pause=0)
    assert [p.newsletter_id for p in retention.purge(env.db, options)] == [nid]
    base = env.cli("stats", str(nid), "--json")[1]
    hard = json.loads(base)["bounces"]["hard"]
    _bounce(env, nid, "hard", 1, 10)  # arrived after the purge: kept, counted on top
    assert json.loads(env.cli("stats", str(nid), "--json")[1])["bounces"]["hard"] == hard + 1
    assert retention.purge(env.db, options) == []  # 10 days old: not yet
    purged = retention.purge(env.db, retention.Options(older_than=5 * 86400, pause=0))
    assert [(p.newsletter_id, p.messages, p.bounces, p.summarized) for p in purged] \
        == [(nid, 0, 1, False)]
    assert _rows(env, "bounces", nid) == 1  # user1's SMTP-time bounce, of today, stays
    assert json.loads(env.cli("stats", str(nid), "--json")[1])["bounces"]["hard"] == hard + 1


def test_purge_deletes_in_chunks_and_sleeps_between_them(env: Env) -> None:
    nid = _sent_newsletter(env, "old", 23)
    _age(env, nid, 100)
    for _ in range(7):
        _bounce(env, nid, "soft", 1, 95)
    pauses: list[float] = []
    # A clock on which every chunk takes 0.1 s: the pause is the larger of
    # --pause and --sleep-coef x that, so 0.4 s here, 0.25 s without the coefficient.
    ticks = iter(range(10_000))
    clock = lambda: next(ticks) * 0.05  # noqa: E731 - start() and rest() each read it once
    done = retention.purge(env.db, retention.Options(older_than=86400, chunk=5, pause=0.25,
                                                     sleep_coef=8.0),
                           sleep=pauses.append, clock=clock)
    assert [(p.messages, p.bounces) for p in done] == [(23, 7)]
    # 23 messages in 5 chunks (4 pauses between), 7 bounces in 2 (1 pause).
    assert pauses == [pytest.approx(0.4)] * 5
    assert _rows(env, "messages", nid) == 0


def test_pause_is_at_least_the_floor(env: Env) -> None:
    nid = _sent_newsletter(env, "floor", 12)
    _age(env, nid, 100)
    pauses: list[float] = []
    done = retention.purge(env.db, retention.Options(older_than=86400, chunk=5, pause=0.25,
                                                     sleep_coef=0.0), sleep=pauses.append)
    assert [p.messages for p in done] == [12]
    assert pauses == [0.25] * 2


def test_cancelled_newsletters_are_purged_too(env: Env) -> None:
    nid = make_newsletter(env, 6, list_name="c")
    admin.cancel(env.db, nid)
    _age(env, nid, 100)
    before = env.cli("stats", str(nid), "--json")[1]
    assert [p.state for p in retention.purge(env.db, retention.Options(older_than=86400,
                                                                       pause=0))] \
        == ["cancelled"]
    after = json.loads(env.cli("stats", str(nid), "--json")[1])
    assert after.pop("purged_at") and {**json.loads(before), "purged_at": None} \
        == {**after, "purged_at": None}
    assert _rows(env, "messages", nid) == 0
