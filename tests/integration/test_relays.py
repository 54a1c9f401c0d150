"""Named relays against real servers on loopback: TLS (STARTTLS and implicit),
AUTH PLAIN/LOGIN, wrong password / untrusted certificate / host-name mismatch,
groups and weights, throttling, and the cluster-wide daily quota (real MariaDB)."""

from __future__ import annotations

import asyncio
import datetime
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from sendsystem.config import Relay, load_config
from sendsystem.delivery import DeliveryPool, Envelope, Outcome, Result
from sendsystem.errors import ConfigError
from sendsystem.relaylimits import ClusterLimits, claim
from sendsystem.smtpstatus import is_throttling
from tests.harness.env import Env
from tests.harness.smtp_server import SmtpServer
from tests.harness.tls_certs import TestCA

SENDER = "bounce+1@bounces.example.com"
USER, PASSWORD = "sender@example.com", "s3cret-Pässword"


def envelope(n: int, group: str = "", recipient: str | None = None) -> Envelope:
    data = (b"From: list@example.com\r\nTo: r@example.com\r\nSubject: test %d\r\n\r\n"
            b"hello\r\n" % n)
    return Envelope(n, SENDER, recipient or f"r{n}@example.com", data, group)


def deliver(relays: Sequence[Relay], envelopes: Sequence[Envelope], *,
            sequence: Sequence[Envelope] = (), **kw: Any
            ) -> tuple[list[Result], list[dict[str, object]]]:
    """Deliver ``envelopes`` concurrently, then ``sequence`` one at a time."""
    async def main() -> tuple[list[Result], list[dict[str, object]]]:
        options: dict[str, Any] = {"connections": 2, "messages_per_connection": 100,
                                   "timeout": 5.0, "helo": "test.example.com",
                                   "relay_backoff_min": 30.0}
        options.update(kw)
        pool = DeliveryPool(relays, **options)
        try:
            results = list(await asyncio.gather(*(pool.deliver(e) for e in envelopes)))
            for e in sequence:
                results.append(await pool.deliver(e))
            return results, pool.relay_status()
        finally:
            await pool.close()
    return asyncio.run(main())


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login.decode() == USER \
        and data.password.decode() == PASSWORD
    return AuthResult(success=ok, handled=False, auth_data=USER if ok else None)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def starttls_server(ca: TestCA) -> Iterator[SmtpServer]:
    """STARTTLS required before anything, AUTH PLAIN/LOGIN only over TLS."""
    leaf = ca.leaf("starttls")
    with SmtpServer(tls_context=leaf.server_context(), require_starttls=True,
                    authenticator=authenticator, auth_required=True,
                    auth_require_tls=True) as srv:
        yield srv


def named(srv: SmtpServer, name: str = "esp", **kw: Any) -> Relay:
    return Relay(srv.host, srv.port, name=name, **kw)


# -- config ---------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.ini"
    path.write_text(text, encoding="utf-8")
    return path


def test_relay_sections_parse_with_password_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, """
[sending]
relays = 127.0.0.1:25
[relay ses-eu]
host = email-smtp.eu-west-1.amazonaws.com
tls = starttls
username = AKIAEXAMPLE
auth = login
rate = 14
daily_quota = 50000
group = customer-a
weight = 2
[relay local]
host = 127.0.0.1
port = 2525
""")
    config = load_config(path, env={"SENDSYSTEM_RELAY_SES_EU_PASSWORD": "from-env"})
    plain, ses, local = config.sending.relays
    assert (str(plain), plain.name, plain.tls) == ("127.0.0.1:25", "", "none")
    assert (ses.name, ses.port, ses.tls, ses.auth, ses.password) == \
        ("ses-eu", 587, "starttls", "login", "from-env")
    assert (ses.rate, ses.daily_quota, ses.group, ses.weight, ses.verify) == \
        (14.0, 50000, "customer-a", 2.0, True)
    assert "from-env" not in repr(ses)  # never logged
    assert (local.port, local.group, local.limited) == (2525, "", False)


@pytest.mark.parametrize(("text", "message"), [
    ("[relay a]\nhost = x\nconections = 3\n", "did you mean 'connections'"),
    ("[relay a b]\nhost = x\n", "[relay NAME]"),
    ("[relays a]\nhost = x\n", "[relay NAME]"),
    ("[relay a]\nport = 25\n", "needs host"),
    ("[relay a]\nhost = x\ntls = ssl\n", "tls = 'ssl'"),
    ("[relay a]\nhost = x\nusername = u\npassword = p\n", "over plain SMTP"),
    ("[relay a]\nhost = x\nrate = 0\n", "rate must be above 0"),
    ("[relay a]\nhost = x\n[relay a]\nhost = y\n", "cannot parse"),
])
def test_bad_relay_sections_are_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), env={})
    assert message in str(exc.value)


def test_throttling_replies() -> None:
    assert is_throttling(454, "4.7.0 Throttling failure: Maximum sending rate exceeded.")
    assert is_throttling(421, "4.7.28 Our system has detected an unusual rate")
    assert is_throttling(452, "4.3.2 Too many messages, slow down")
    assert is_throttling(451, "4.7.1 Rate limit exceeded, try again later")
    assert not is_throttling(421, "4.3.2 Service shutting down")
    assert not is_throttling(451, "4.7.1 Greylisted, please try again later")
    assert not is_throttling(452, "4.2.2 Mailbox full")
    assert not is_throttling(554, "5.7.1 Rate limit exceeded")  # permanent: not our pace


# -- TLS and AUTH ---------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["plain", "login", "auto"])
def test_starttls_and_auth(starttls_server: SmtpServer, ca: TestCA, auth: str) -> None:
    relay = named(starttls_server, tls="starttls", ca_file=ca.path, username=USER,
                  password=PASSWORD, auth=auth)
    results, status = deliver([relay], [envelope(i) for i in range(6)])
    assert [r.outcome for r in results] == [Outcome.SENT] * 6
    assert len(starttls_server.messages) == 6
    # Every MAIL FROM came over TLS from the authenticated user.
    assert starttls_server.handler.mail_commands == [(SENDER, True, USER)] * 6
    assert status[0]["health"] == "ok" and status[0]["relay"] == "esp"


def test_implicit_tls(ca: TestCA) -> None:
    leaf = ca.leaf("implicit")
    with SmtpServer(ssl_context=leaf.server_context()) as srv:
        results, _ = deliver([named(srv, tls="tls", ca_file=ca.path)],
                             [envelope(i) for i in range(4)])
        assert [r.outcome for r in results] == [Outcome.SENT] * 4
        assert [tls for _, tls, _ in srv.handler.mail_commands] == [True] * 4


def test_wrong_password_defers_with_reason(starttls_server: SmtpServer, ca: TestCA) -> None:
    relay = named(starttls_server, tls="starttls", ca_file=ca.path, username=USER,
                  password="wrong")
    results, status = deliver([relay], [envelope(i) for i in range(3)])
    assert {r.outcome for r in results} == {Outcome.DEFERRED}
    assert status[0]["health"] == "set aside"
    assert "authentication failed: 535" in str(status[0]["last_error"])
    assert starttls_server.handler.mail_commands == []
    assert starttls_server.messages == []


@pytest.mark.parametrize(("case", "reason"), [
    ("untrusted", "certificate verify failed"),
    ("wrong host", "match"),
    ("no starttls", "STARTTLS"),
])
def test_tls_failures_defer_and_send_nothing_in_clear(ca: TestCA, tmp_path: Path,
                                                      case: str, reason: str) -> None:
    kwargs: dict[str, Any] = {}
    ca_file: Path | None = ca.path
    if case == "untrusted":
        ca_file = None  # the system store does not know our private CA
        kwargs = {"tls_context": ca.leaf("untrusted").server_context()}
    elif case == "wrong host":
        kwargs = {"tls_context": ca.leaf("other", ("mail.other.example",)).server_context()}
    with SmtpServer(**kwargs) as srv:
        relay = named(srv, tls="starttls", ca_file=ca_file, username=USER, password=PASSWORD)
        results, status = deliver([relay], [envelope(i) for i in range(3)])
        assert {r.outcome for r in results} == {Outcome.DEFERRED}
        assert status[0]["health"] == "set aside"
        assert "TLS" in str(status[0]["last_error"])
        assert reason in str(status[0]["last_error"])
        assert srv.handler.mail_commands == [] and srv.messages == []
        assert all("no relay available" in r.reply for r in results)


# -- groups, weights, throttling ------------------------------------------------------

def test_groups_and_weights() -> None:
    with SmtpServer() as a1, SmtpServer() as a2, SmtpServer() as b, SmtpServer() as plain:
        relays = [named(a1, "a1", group="a", weight=3), named(a2, "a2", group="a", weight=1),
                  named(b, "b", group="b"), plain.relay]
        envs = [envelope(i, "a") for i in range(40)] + \
            [envelope(100 + i, "b") for i in range(10)] + \
            [envelope(200 + i) for i in range(5)] + [envelope(300, "nosuch")]
        results, _ = deliver(relays, envs, connections=1)
        got = {r.key: r for r in results}
        # One at a time (spare capacity everywhere): the weights decide alone.
        a1_before, a2_before = len(a1.messages), len(a2.messages)
        sequential = deliver(relays[:2], [], connections=1, sequence=[
            envelope(500 + i, "a") for i in range(40)])
        assert {got[i].relay for i in range(40)} == {"a1", "a2"}
        assert {got[100 + i].relay for i in range(10)} == {"b"}
        assert {got[200 + i].relay for i in range(5)} == {str(plain.relay)}
        assert got[300].outcome is Outcome.DEFERRED and "no relay in group 'nosuch'" \
            in got[300].reply
        assert a1_before + a2_before == 40 and len(b.messages) == 10
        assert len(plain.messages) == 5
        # Weighted 3:1: A A B A, A A B A, ... (smooth weighted round-robin).
        assert {r.outcome for r in sequential[0]} == {Outcome.SENT}
        assert (len(a1.messages) - a1_before, len(a2.messages) - a2_before) == (30, 10)


def test_throttled_relay_slows_down_and_delivers_everything() -> None:
    with SmtpServer() as srv:
        n = 60
        for i in range(0, n, 2):  # half the messages: 454 once
            srv.rule(f"r{i}@example.com",
                     "454 4.7.0 Throttling failure: Maximum sending rate exceeded.",
                     times=1, stage="data")
        # Its rate (40/s) is what the pool halves; no cluster limits here, so not enforced.
        relay = named(srv, "ses", rate=40.0)
        results, status = deliver([relay], [envelope(i) for i in range(n)], connections=4)
        counts = Counter(r for m in srv.messages for r in m.rcpt_tos)
    assert counts == {f"r{i}@example.com": 1 for i in range(n)}
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert status[0]["health"] == "slowed" and status[0]["throttled"] >= 1
    slow = status[0]["slow_rate"]
    assert isinstance(slow, float) and slow <= 20, status


def test_auth_required_at_mail_from_sets_aside(ca: TestCA) -> None:
    with SmtpServer(tls_context=ca.leaf("req").server_context(), authenticator=authenticator,
                    auth_required=True) as srv:
        # Configured without a username: "530 Authentication required" is the relay's settings.
        results, status = deliver([named(srv, tls="starttls", ca_file=ca.path)],
                                  [envelope(1)])
        assert results[0].outcome is Outcome.DEFERRED
        assert status[0]["health"] == "set aside"
        assert "530" in str(status[0]["last_error"])


# -- cluster-wide quota (real MariaDB, settable clock) --------------------------------

def test_daily_quota_stops_then_next_day_continues(env: Env) -> None:
    day = datetime.datetime(2026, 3, 1, 12, 0, 0)
    clock: dict[str, datetime.datetime] = {"now": day}

    async def claim_fn(relay: Relay, n: int, now: datetime.datetime | None,
                       factor: float) -> Any:
        return await asyncio.to_thread(claim, env.db, relay, n, now, factor)

    def run(relay: Relay, keys: range) -> list[Result]:
        async def main() -> list[Result]:
            limits = ClusterLimits(claim_fn, now=lambda: clock["now"])
            pool = DeliveryPool([relay], connections=4, messages_per_connection=1000,
                                timeout=5, helo="t.example", limits=limits)
            try:
                return list(await asyncio.gather(*(pool.deliver(envelope(i)) for i in keys)))
            finally:
                await pool.close()
        return asyncio.run(main())

    with SmtpServer() as srv:
        relay = named(srv, "quota", daily_quota=300, rate=1000.0)
        first = run(relay, range(400))
        assert len(srv.messages) == 300
        assert Counter(r.outcome for r in first) == {Outcome.SENT: 300, Outcome.DEFERRED: 100}
        assert all("daily quota of 300 used up" in r.reply
                   for r in first if r.outcome is Outcome.DEFERRED)
        # Later the same day: still nothing.
        clock["now"] = day + datetime.timedelta(hours=11, minutes=59)
        again = run(relay, range(400, 410))
        assert len(srv.messages) == 300 and {r.outcome for r in again} == {Outcome.DEFERRED}
        # The next day the rest goes.
        clock["now"] = day + datetime.timedelta(days=1)
        rest = run(relay, range(400, 500))
        assert {r.outcome for r in rest} == {Outcome.SENT}
        assert len(srv.messages) == 400
    used = env.db.fetchone("relay_peek", {"relay": "quota", "burst": 1, "rate": 1, "now":
                                          clock["now"]})
    assert used is not None and int(used["used_today"]) == 100


def test_relay_with_rate_and_other_name_is_replaced() -> None:
    # A frozen Relay: replace() keeps every field (used by tests above).
    r = Relay("h", 1, name="x", rate=5.0)
    assert replace(r, name="y").rate == 5.0


def test_relay_lines_are_cleaned_and_show_health() -> None:
    from sendsystem.reports.text import format_relays, format_status
    relay = {"relay": "ses", "group": "cust-a", "health": "slowed", "slowed_to": 7.0,
             "rate": 6.9, "rate_limit": 14.0, "quota_used_today": 120, "daily_quota": 50000,
             "last_error": "454 Throttling\x1b[31m failure"}
    (head, line) = format_relays([relay], width=200)
    assert "LAST ERROR" in head
    assert "slowed (7.0/s)" in line and "120/50000" in line and "14/s" in line
    assert "\x1b" not in line and "454 Throttling?[31m failure" in line
    assert "Relays:" in format_status({"workers": [], "newsletters": [], "relays": [relay]})


def test_idle_connection_is_replaced_and_a_refusal_is_reset() -> None:
    async def main(relay: Relay) -> list[Result]:
        pool = DeliveryPool([relay], connections=1, messages_per_connection=100, timeout=5,
                            helo="t.example")
        try:
            first = [await pool.deliver(envelope(1)), await pool.deliver(envelope(2))]
            await asyncio.sleep(0.6)  # longer than idle_timeout: a new connection
            return [*first, await pool.deliver(envelope(3))]
        finally:
            await pool.close()

    with SmtpServer() as srv:
        srv.rule("r1@example.com", "550 5.7.1 Refused by policy")
        results = asyncio.run(main(named(srv, idle_timeout=0.3)))
        connections = [m.connection for m in srv.messages]
    # r1 refused, r2 on the same connection after RSET (no "503 sender already
    # specified"), r3 on a new connection because the old one sat idle too long.
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.SENT, Outcome.SENT]
    assert connections == [1, 2]
