"""The stats timeline of a real short send: per-second buckets that add up, and
an HTML report that draws them with a colour per worker."""

from __future__ import annotations

import json

from sendsystem import stats
from tests.harness.env import Env
from tests.harness.helpers import make_newsletter
from tests.harness.smtp_server import SmtpServer
from tests.integration.test_sending import relay_config, run_pipeline_once


def test_short_send_has_a_per_second_timeline(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, 40)
        run_pipeline_once(env)
    facts = stats.newsletter_stats(env.db, nid)
    detail = facts["timeline_detail"]
    assert detail["bucket_seconds"] == 1
    assert sum(r["sent"] for r in detail["rows"]) == facts["counts"]["sent"] == 40
    assert sum(r["sent"] for r in facts["timeline"]) == 40  # the per-minute view agrees
    assert {r["worker"] for r in detail["rows"]} == {"tw"}
    assert all(r["at"].endswith(tuple(f"{s:02d}" for s in range(60))) and len(r["at"]) == 19
               for r in detail["rows"])
    html = env.tmp / "r.html"
    code, out, err = env.cli("stats", str(nid), "--json", "--html", str(html))
    assert code == 0, err
    assert json.loads(out)["timeline_detail"] == detail
    page = html.read_text(encoding="utf-8")
    assert "Messages sent per second" in page and 'data-worker="tw"' in page
