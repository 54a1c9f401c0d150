"""Open and click tracking end to end on a real MariaDB: the sort worker's rewriting
(unsubscribe links, List-Unsubscribe and the text part left alone), the /c/ and /o/
routes of the real WSGI app through a real HTTP server, forged and altered tokens,
unique counting, a link scanner's burst, the spool while the database is cut off
(tests/harness/proxy.py) and its replay, purge and forget."""

from __future__ import annotations

import email
import email.policy
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sendsystem import admin, compose
from sendsystem.merge import decompress
from sendsystem.tracking.recorder import HitRow, Recorder
from sendsystem.tracking.tokens import CLICK, OPEN, Signer
from sendsystem.unsubscribe.app import make_wsgi_server
from sendsystem.unsubscribe.service import unsubscribe_wsgi_app
from tests.harness.env import Env
from tests.harness.helpers import make_newsletter, sql
from tests.harness.proxy import TcpProxy
from tests.integration.test_sorting import run_sort_once

HTML = """<html><body><h1>Hej {{ first_name }}</h1>
<p><a href="https://news.example.com/a?id={{ newsletter.id }}&amp;x=1">A</a>
<a class="b" href="https://news.example.com/b">B</a>
<a href="https://news.example.com/c">C</a>
<a href="mailto:help@example.com">help</a></p>
<p><a href="{{ unsubscribe_url }}">Afmeld</a></p></body></html>"""
TEXT = "Hej {{ first_name }}\nLaes: https://news.example.com/a\nAfmeld: {{ unsubscribe_url }}\n"
BASE = "https://t.test.example"
AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120 Safari/537.36"


def tracking_on(env: Env, **extra: object) -> None:
    env.configure(tracking={"enabled": "yes", "base_url": BASE,
                            "spool_dir": str(env.tmp / "spool"), "flush_interval": 0.2,
                            **extra})


def stored(env: Env, message_id: int) -> email.message.EmailMessage:
    row = sql(env, "SELECT m.body, n.zdict FROM messages m JOIN newsletters n "
                   "ON n.id = m.newsletter_id WHERE m.id = %s", (message_id,))[0]
    raw = decompress(row["body"], row["zdict"])
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def test_sort_worker_rewrites_html_links_only(env: Env) -> None:
    tracking_on(env)
    nid = make_newsletter(env, 3, html=HTML, text=TEXT)
    sql(env, "UPDATE lists SET track = 'opens,clicks'")
    sql(env, "UPDATE newsletters SET track = 'opens,clicks' WHERE id = %s", (nid,))
    off = make_newsletter(env, 3, html=HTML, text=TEXT)
    sql(env, "UPDATE newsletters SET track = '' WHERE id = %s", (off,))
    run_sort_once(env, "w1")
    signer = Signer.from_secret(env.config.secret())
    links = {int(r["idx"]): r["url"] for r in sql(
        env, "SELECT idx, url FROM newsletter_links WHERE newsletter_id = %s", (nid,))}
    assert sorted(links.values()) == [f"https://news.example.com/a?id={nid}&x=1",
                                      "https://news.example.com/b", "https://news.example.com/c"]
    rows = sql(env, "SELECT id, subscriber_id, newsletter_id FROM messages WHERE state = "
                    "'merged' ORDER BY id")
    for row in rows:
        msg = stored(env, row["id"])
        html_part = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text_part = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "List-Unsubscribe" not in msg  # added at send time, never rewritten
        assert "https://lists.test.example/unsubscribe/" in html_part
        assert 'href="mailto:help@example.com"' in html_part
        assert "https://news.example.com/a" in text_part and BASE not in text_part
        if row["newsletter_id"] == off:
            assert BASE not in html_part
            continue
        tokens = [h.split('"', 1)[0] for h in html_part.split(f'href="{BASE}/c/')[1:]]
        assert len(tokens) == 3
        for token in tokens:
            hit = signer.verify(CLICK, token)
            assert hit is not None and hit.message_id == row["id"] and hit.link_idx in links
        pixel = html_part.split(f'<img src="{BASE}/o/', 1)[1].split('"', 1)[0]
        assert signer.verify(OPEN, pixel) is not None
        assert html_part.index("<img src=") < html_part.index("</body>")
    # The headers added at send time: List-Unsubscribe is the plain signed URL.
    composer = compose.Composer(env.config, env.config.secret())
    row = rows[0]
    parts = composer.remember(row["newsletter_id"], admin.get_newsletter(env.db, nid), [])
    assert parts is not None
    envelope = composer.envelope({"id": row["id"], "subscriber_id": row["subscriber_id"],
                                  "email": "user0@example.com",
                                  "body": sql(env, "SELECT body FROM messages WHERE id = %s",
                                              (row["id"],))[0]["body"]}, parts)
    wire = email.message_from_bytes(envelope.data, policy=email.policy.default)
    assert wire["List-Unsubscribe"].startswith("<https://lists.test.example/unsubscribe/")
    assert BASE not in str(wire["List-Unsubscribe"])


def test_list_set_track_and_enqueue_override(env: Env) -> None:
    make_newsletter(env, 1)
    code, out, err = env.cli("list", "set", "news", "--track", "opens,clicks")
    assert code == 0, err
    assert "not yet in effect" in out
    (env.tmp / "x.html").write_text("<p>x</p>")
    admin.add_template(env.db, "x", "s", env.tmp / "x.html", None)
    code, _, err = env.cli("enqueue", "--list", "news", "--template", "x")
    assert code == 0, err
    code, _, err = env.cli("enqueue", "--list", "news", "--template", "x", "--no-track")
    assert code == 0, err
    assert [r["track"] for r in sql(env, "SELECT track FROM newsletters ORDER BY id")] == \
        ["", "opens,clicks", ""]
    code, _, err = env.cli("list", "set", "news", "--track", "reads")
    assert code == 1 and "not a tracking kind" in err


# ----------------------------------------------------------------- the web app

@dataclass
class Site:
    base: str
    app: Any
    env: Env
    signer: Signer
    nid: int
    messages: list[int]
    links: dict[str, int]

    @property
    def recorder(self) -> Recorder:
        rec = self.app.tracking.recorder
        assert isinstance(rec, Recorder)
        return rec

    def get(self, path: str, agent: str = AGENT, method: str = "GET"
            ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, method=method,
                                     headers={"User-Agent": agent})
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers), err.read()

    def click(self, message: int, url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.get(f"/c/{self.signer.click(self.nid, message, self.links[url])}", **kw)

    def open(self, message: int, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.get(f"/o/{self.signer.open(self.nid, message)}", **kw)

    def events(self) -> list[dict[str, Any]]:
        self.recorder.flush()
        return sql(self.env, "SELECT * FROM tracking_events ORDER BY id")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


URLS = [f"https://news.example.com/{i}" for i in range(6)]


def start(env: Env) -> Iterator[Site]:
    nid = make_newsletter(env, 4)
    # Delivered an hour ago (beyond machine_seconds), as the send worker records it.
    sql(env, "UPDATE messages SET state = 'sent', finished_at = TIMESTAMPADD(HOUR, -1, NOW(6))")
    sql(env, "UPDATE newsletters SET track = 'opens,clicks'")
    signer = Signer.from_secret(env.config.secret())
    links = {url: signer.link_idx(url) for url in URLS}
    for url, idx in links.items():
        sql(env, "INSERT INTO newsletter_links (newsletter_id, idx, url) VALUES (%s, %s, %s)",
            (nid, idx, url))
    messages = [int(r["id"]) for r in sql(env, "SELECT id FROM messages ORDER BY id")]
    app = unsubscribe_wsgi_app(env.config)
    app.tracking.recorder.start_thread = False  # the test flushes when it wants to
    httpd = make_wsgi_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield Site(f"http://127.0.0.1:{httpd.server_port}", app, env, signer, nid, messages,
                   links)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
        app.tracking.close()


@pytest.fixture
def site(env: Env) -> Iterator[Site]:
    tracking_on(env)
    yield from start(env)


def test_click_redirects_to_the_stored_url_and_open_returns_the_pixel(site: Site) -> None:
    status, headers, _ = site.click(site.messages[0], URLS[2])
    assert status == 302 and headers["Location"] == URLS[2]
    assert "no-store" in headers["Cache-Control"]
    status, headers, body = site.open(site.messages[0])
    assert status == 200 and headers["Content-Type"] == "image/gif" and body.startswith(b"GIF89a")
    assert "no-cache" in headers["Cache-Control"]
    events = site.events()
    assert [(e["kind"], e["message_id"], e["verdict"]) for e in events] == \
        [("click", site.messages[0], 0), ("open", site.messages[0], 0)]
    assert events[0]["link_idx"] == site.links[URLS[2]]


def test_forged_and_altered_tokens_get_404_and_record_nothing(site: Site) -> None:
    good = site.signer.click(site.nid, site.messages[0], site.links[URLS[0]])
    forged = Signer.from_secret(b"not our secret, but long enough!!!")
    bad = [good[:-1] + ("A" if good[-1] != "A" else "B"),      # altered link part
           good[:5] + ("x" if good[5] != "x" else "y") + good[6:],  # altered message part
           forged.click(site.nid, site.messages[0], site.links[URLS[0]]),
           site.signer.click(site.nid, site.messages[0], site.signer.link_idx("https://evil/")),
           "../../etc/passwd", "", good + "A"]
    for token in bad:
        status, headers, _ = site.get(f"/c/{token}")
        assert status == 404, token
        assert "Location" not in headers
    assert site.get("/o/" + good)[0] == 404
    assert site.get(f"/o/{forged.open(site.nid, site.messages[0])}")[0] == 404
    assert site.events() == []
    # The unsubscribe app is still there, beside the tracking routes.
    assert site.get("/healthz")[0] == 200


def test_unique_per_recipient_and_machine_hits_apart(site: Site) -> None:
    m0, m1, m2, m3 = site.messages
    for _ in range(3):
        site.open(m0)
    site.open(m1, agent="Mozilla/5.0")                                     # Apple MPP
    site.open(m2, agent="Mozilla/5.0 (compatible; BingPreview/1.0b)")      # scanner
    site.click(m0, URLS[1])
    site.click(m0, URLS[1])
    site.click(m1, URLS[1], method="HEAD")
    # A link scanner clicking every link of m3's message within one second.
    for url in URLS:
        site.click(m3, url)
    assert len(site.events()) == 3 + 2 + 2 + 1 + len(URLS)
    code, out, err = site.env.cli("stats", str(site.nid), "--json")
    assert code == 0, err
    t = json.loads(out)["tracking"]
    assert (t["unique_opens"], t["machine_opens"]) == (1, 2)
    assert t["machine_reasons"]["opens"] == {"proxy": 1, "scanner": 1}
    assert (t["unique_clicks"], t["machine_clicks"]) == (1, 2)
    assert t["machine_reasons"]["clicks"]["burst"] == 1
    assert t["hits"] == {"opens": 5, "clicks": 3 + len(URLS)}
    top = t["top_links"][0]
    assert top["url"] == URLS[1] and top["clicks"] == 1 and top["hits"] == 4
    assert t["timeline"]["rows"] and t["timeline"]["bucket_seconds"] == 3600
    burst = sql(site.env, "SELECT DISTINCT verdict FROM tracking_events WHERE message_id = %s",
                (m3,))
    assert [r["verdict"] for r in burst] == [4]
    # The text and HTML reports show it too.
    code, text, err = site.env.cli("stats", str(site.nid), "--html", str(site.env.tmp / "r.html"))
    assert code == 0, err
    assert "Opens and clicks" in text and URLS[1] in text
    page = (site.env.tmp / "r.html").read_text()
    assert "Unique opens" in page and 'data-series="machine_clicks"' in page


def test_hits_within_seconds_of_delivery_are_machine(site: Site) -> None:
    sql(site.env, "UPDATE messages SET finished_at = NOW(6) WHERE id = %s", (site.messages[0],))
    site.open(site.messages[0])
    assert [e["verdict"] for e in site.events()] == [1]


def test_database_cut_off_hits_are_spooled_then_replayed_once(env: Env) -> None:
    with TcpProxy("127.0.0.1", env.config.database.port) as proxy:
        tracking_on(env)
        env.configure(database={"port": proxy.port},
                      tracking={"enabled": "yes", "base_url": BASE,
                                "spool_dir": str(env.tmp / "spool")})
        for s in start(env):
            s.click(s.messages[0], URLS[0])          # warms the link table cache
            assert len(s.events()) == 1
            proxy.cut()
            for m in s.messages:
                assert s.click(m, URLS[0])[0] == 302  # cached links redirect through it
                assert s.open(m)[0] == 200
            s.recorder.flush()
            spools = list((env.tmp / "spool").glob("hits-*.spool"))
            assert len(spools) == 1 and len(spools[0].read_bytes().splitlines()) == 8
            proxy.heal()
            s.recorder._down_until = 0.0  # no need to wait out the back-off here
            s.recorder.flush()
            rows = sql(env, "SELECT kind, COUNT(*) AS n FROM tracking_events GROUP BY kind")
            assert {r["kind"]: int(r["n"]) for r in rows} == {"click": 5, "open": 4}
            assert spools[0].read_bytes() == b""
            # A replay of the same file again stores nothing twice.
            s.recorder.write(list(_rows_of(s, 9)))
            assert int(sql(env, "SELECT COUNT(*) AS n FROM tracking_events")[0]["n"]) == 9


def _rows_of(site: Site, n: int) -> list[HitRow]:
    rows = sql(site.env, "SELECT * FROM tracking_events ORDER BY id LIMIT %s", (n,))
    return [HitRow(bytes(r["hit"]), r["newsletter_id"], r["message_id"], r["kind"],
                   r["link_idx"], r["at"], r["verdict"]) for r in rows]


def test_a_dead_processes_spool_is_replayed_by_another(site: Site) -> None:
    site.open(site.messages[0])
    rows = _rows_of(site, 1)
    sql(site.env, "DELETE FROM tracking_events")
    spool = site.env.tmp / "spool"
    spool.mkdir(exist_ok=True)
    left = spool / "hits-999999-deadbeef.spool"
    left.write_text("".join(r.to_json() + "\n" for r in rows) + '["torn')
    site.recorder._orphans_at = 0.0
    site.recorder.flush()
    assert not left.exists()
    assert [e["message_id"] for e in site.events()] == [site.messages[0]]


def test_purge_keeps_the_figures_and_forget_removes_a_person(site: Site) -> None:
    for m in site.messages[:2]:
        site.open(m)
        site.click(m, URLS[0])
    site.events()
    before = json.loads(site.env.cli("stats", str(site.nid), "--json")[1])["tracking"]
    assert before["unique_opens"] == 2
    sql(site.env, "UPDATE newsletters SET state = 'done', finished_at = "
                  "TIMESTAMPADD(DAY, -100, NOW(6))")
    sql(site.env, "UPDATE tracking_events SET at = TIMESTAMPADD(DAY, -95, at)")
    sql(site.env, "UPDATE tracking_unique SET first_at = TIMESTAMPADD(DAY, -95, first_at), "
                  "last_at = TIMESTAMPADD(DAY, -95, last_at), "
                  "first_human_at = TIMESTAMPADD(DAY, -95, first_human_at)")
    before = json.loads(site.env.cli("stats", str(site.nid), "--json")[1])["tracking"]
    code, _out, err = site.env.cli("purge", "--older-than", "90d", "--pause", "0",
                                  "--sleep-coef", "0")
    assert code == 0, err
    assert int(sql(site.env, "SELECT COUNT(*) AS n FROM tracking_events")[0]["n"]) == 0
    assert int(sql(site.env, "SELECT COUNT(*) AS n FROM tracking_unique")[0]["n"]) == 0
    after = json.loads(site.env.cli("stats", str(site.nid), "--json")[1])["tracking"]
    assert after == before
    # Links in old mail keep redirecting.
    assert site.click(site.messages[0], URLS[0])[0] == 302


def test_forget_statements_remove_one_persons_hits(site: Site) -> None:
    site.open(site.messages[0])
    site.open(site.messages[1])
    site.events()
    email_of = sql(site.env, "SELECT s.email FROM messages m JOIN subscribers s ON "
                             "s.id = m.subscriber_id WHERE m.id = %s", (site.messages[0],))
    for name in ("forget_tracking_unique", "forget_tracking_events"):
        site.env.db.execute(name, {"email": email_of[0]["email"]})
    for table in ("tracking_events", "tracking_unique"):
        left = sql(site.env, f"SELECT DISTINCT message_id FROM {table}")
        assert [r["message_id"] for r in left] == [site.messages[1]]
