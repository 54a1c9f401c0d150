"""DeliveryPool against real in-process SMTP servers (aiosmtpd); no mocks."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest

from sendsystem.config import Relay
from sendsystem.delivery import DeliveryPool, Envelope, Outcome, Result, Withdrawn
from tests.harness.smtp_server import SmtpServer

SENDER = "bounce+1@bounces.example.com"


def message(n: int, size: int = 2000) -> bytes:
    body = (b"x" * 70 + b"\r\n") * (size // 72)
    return (b"From: list@example.com\r\nTo: r@example.com\r\nSubject: test %d\r\n\r\n" % n
            + b".leading dot line\r\n" + body)


def env(n: int, recipient: str | None = None) -> Envelope:
    return Envelope(n, SENDER, recipient or f"r{n}@example.com", message(n))


def closed_port() -> Relay:
    """A port on 127.0.0.1 with nothing listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Relay("127.0.0.1", port)


def pool(relays: Sequence[Relay], **kw: object) -> DeliveryPool:
    options: dict[str, object] = {"connections": 2, "messages_per_connection": 100,
                                  "timeout": 5.0, "helo": "test.example.com"}
    options.update(kw)
    return DeliveryPool(relays, **options)  # type: ignore[arg-type]


def run(relays: Sequence[Relay], envelopes: Sequence[Envelope], **kw: object
        ) -> tuple[list[Result], list[dict[str, object]]]:
    async def main() -> tuple[list[Result], list[dict[str, object]]]:
        p = pool(relays, **kw)
        try:
            results = await asyncio.gather(*(p.deliver(e) for e in envelopes))
            return list(results), p.relay_status()
        finally:
            await p.close()
    return asyncio.run(main())


@pytest.fixture
def server():
    with SmtpServer() as srv:
        yield srv


def test_250_is_sent_with_reply_and_exact_bytes(server: SmtpServer) -> None:
    (result,), _ = run([server.relay], [env(1)])
    assert result.outcome is Outcome.SENT
    assert result.code == 250
    assert result.reply.startswith("250 2.0.0 Ok: queued as T")
    assert result.relay == f"127.0.0.1:{server.port}"
    assert not result.blames_recipient
    (msg,) = server.messages
    assert msg.mail_from == SENDER and msg.rcpt_tos == ("r1@example.com",)
    # Dot-stuffing is undone by the server: it must see exactly our bytes.
    assert msg.data == message(1)


def test_dot_stuffing_and_bare_line_ends(server: SmtpServer) -> None:
    starts_with_dot = b".first line\r\n..two dots\r\n.\r\nlast\r\n"
    bare_lf = b"Subject: lf only\n\nline\n.dot\n"
    results, _ = run([server.relay], [Envelope(1, SENDER, "a@example.com", starts_with_dot),
                                      Envelope(2, SENDER, "b@example.com", bare_lf)],
                     connections=1)
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    got = {m.rcpt_tos[0]: m.data for m in server.messages}
    assert got["a@example.com"] == starts_with_dot
    assert got["b@example.com"] == bare_lf.replace(b"\n", b"\r\n")


def test_unusual_addresses(server: SmtpServer) -> None:
    results, _ = run([server.relay], [
        Envelope(1, SENDER, '"john doe"@example.com', message(1)),
        Envelope(2, SENDER, "bad\r\nRCPT TO:<x@example.com>", message(2)),
    ], connections=1)
    assert results[0].outcome is Outcome.SENT
    assert results[1].outcome is Outcome.FAILED and results[1].blames_recipient
    assert server.count_by_recipient() == {'"john doe"@example.com': 1}


def test_user_unknown_fails_and_blames_recipient(server: SmtpServer) -> None:
    server.rule("gone@example.com", "550 5.1.1 User unknown")
    results, _ = run([server.relay], [env(1, "gone@example.com"), env(2)])
    assert results[0].outcome is Outcome.FAILED
    assert results[0].code == 550 and results[0].blames_recipient
    assert results[0].reply == "550 5.1.1 User unknown"
    assert results[1].outcome is Outcome.SENT  # connection was reset and reused
    assert server.count_by_recipient() == {"r2@example.com": 1}


def test_policy_rejection_fails_without_blaming(server: SmtpServer) -> None:
    server.rule("strict@example.com", "550 5.7.1 Policy")
    (result,), _ = run([server.relay], [env(1, "strict@example.com")])
    assert result.outcome is Outcome.FAILED and result.code == 550
    assert not result.blames_recipient


def test_data_stage_rejection(server: SmtpServer) -> None:
    server.rule("spamtrap@example.com", "554 5.7.1 Message rejected as spam", stage="data")
    results, _ = run([server.relay], [env(1, "spamtrap@example.com"), env(2)],
                     connections=1)
    assert results[0].outcome is Outcome.FAILED and results[0].code == 554
    assert results[1].outcome is Outcome.SENT
    assert server.connections == 1


def test_451_defers_then_sends(server: SmtpServer) -> None:
    server.rule("slow@example.com", "451 4.3.0 try later", times=1)

    async def main() -> tuple[Result, Result]:
        p = pool([server.relay])
        try:
            first = await p.deliver(env(1, "slow@example.com"))
            second = await p.deliver(env(1, "slow@example.com"))
            return first, second
        finally:
            await p.close()

    first, second = asyncio.run(main())
    assert first.outcome is Outcome.DEFERRED and first.code == 451
    assert not first.blames_recipient
    assert second.outcome is Outcome.SENT
    assert server.count_by_recipient() == {"slow@example.com": 1}


def test_421_defers_and_sets_relay_aside(server: SmtpServer) -> None:
    server.rule("any@example.com", "421 4.3.2 shutting down", times=1)

    async def main() -> tuple[Result, Result, list[dict[str, object]]]:
        p = pool([server.relay], relay_backoff_min=30.0)
        try:
            first = await p.deliver(env(1, "any@example.com"))
            second = await p.deliver(env(2))  # relay still set aside: no attempt
            return first, second, p.relay_status()
        finally:
            await p.close()

    first, second, status = asyncio.run(main())
    assert first.outcome is Outcome.DEFERRED and first.code == 421
    assert "4.3.2 shutting down" in first.reply
    assert second.outcome is Outcome.DEFERRED
    assert second.reply.startswith("no relay available:")
    assert status[0]["up"] is False and status[0]["retry_at"] is not None
    assert server.messages == []


def test_relay_back_after_backoff(server: SmtpServer) -> None:
    server.rule("any@example.com", "421 4.3.2 shutting down", times=1)

    async def main() -> tuple[Result, Result]:
        p = pool([server.relay], relay_backoff_min=0.2, relay_backoff_max=0.2)
        try:
            first = await p.deliver(env(1, "any@example.com"))
            await asyncio.sleep(0.3)
            return first, await p.deliver(env(1, "any@example.com"))
        finally:
            await p.close()

    first, second = asyncio.run(main())
    assert first.outcome is Outcome.DEFERRED
    assert second.outcome is Outcome.SENT
    assert server.count_by_recipient() == {"any@example.com": 1}


def test_one_relay_down_everything_goes_through_the_live_one(server: SmtpServer) -> None:
    dead = closed_port()
    envelopes = [env(i) for i in range(40)]
    results, status = run([dead, server.relay], envelopes)
    assert all(r.outcome is Outcome.SENT for r in results), results
    assert {r.relay for r in results} == {f"127.0.0.1:{server.port}"}
    assert len(server.messages) == 40
    by_name = {s["relay"]: s for s in status}
    assert by_name[str(dead)]["up"] is False
    assert by_name[str(server.relay)]["sent"] == 40


def test_relay_that_never_greets_is_set_aside(server: SmtpServer) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog) but never says 220
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        mute = Relay("127.0.0.1", silent.getsockname()[1])
        results, status = run([mute, server.relay], [env(i) for i in range(10)], timeout=0.3)
    assert all(r.outcome is Outcome.SENT for r in results)
    by_name = {s["relay"]: s for s in status}
    assert by_name[str(mute)]["up"] is False
    assert "Timed out" in str(by_name[str(mute)]["last_error"])


def test_load_is_spread_over_two_relays() -> None:
    with SmtpServer() as a, SmtpServer() as b:
        results, _ = run([a.relay, b.relay], [env(i) for i in range(60)])
        assert all(r.outcome is Outcome.SENT for r in results)
        assert len(a.messages) + len(b.messages) == 60
        assert len(a.messages) >= 10 and len(b.messages) >= 10


def test_all_relays_down_defers_promptly() -> None:
    relays = [closed_port(), closed_port()]

    async def main() -> tuple[list[Result], float]:
        p = pool(relays, timeout=2.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            results = await asyncio.gather(*(p.deliver(env(i)) for i in range(20)))
            return list(results), loop.time() - start
        finally:
            await p.close()

    results, elapsed = asyncio.run(main())
    assert all(r.outcome is Outcome.DEFERRED and r.code == 0 for r in results)
    assert all(r.reply.startswith("no relay available:") for r in results)
    assert elapsed < 2.0  # no hanging until a timeout (generous bound, not a benchmark)


def test_messages_per_connection_respected(server: SmtpServer) -> None:
    results, status = run([server.relay], [env(i) for i in range(25)],
                          connections=1, messages_per_connection=10)
    assert all(r.outcome is Outcome.SENT for r in results)
    assert server.connections == 3
    per_connection = [m.connection for m in server.messages]
    assert max(per_connection.count(c) for c in set(per_connection)) == 10
    assert status[0]["connections_opened"] == 3


def test_concurrency_bounded_by_connections(server: SmtpServer) -> None:
    results, status = run([server.relay], [env(i) for i in range(50)],
                          connections=3, messages_per_connection=1000)
    assert all(r.outcome is Outcome.SENT for r in results)
    assert server.connections == 3
    assert status[0]["busy"] == 0


def test_timeout_defers_without_duplicate(server: SmtpServer) -> None:
    server.rule("tarpit@example.com", "250 2.0.0 Ok", times=1, stage="data", delay=1.0)
    (result,), _ = run([server.relay], [env(1, "tarpit@example.com")], timeout=0.3)
    assert result.outcome is Outcome.DEFERRED and result.code == 0
    assert "delivery status unknown" in result.reply


def test_ready_is_asked_after_354_and_a_no_withdraws_without_sending(
        server: SmtpServer) -> None:
    """The send worker's point of no return: ``ready()`` runs after the relay's 354,
    before any byte of the body. A no closes the connection in the middle of DATA
    (an RSET there would be message text): the relay discards the transaction,
    Withdrawn is raised, and the pool goes on with a new connection."""
    asked: list[int] = []

    async def main() -> Result:
        p = pool([server.relay], connections=1)
        try:
            async def no() -> bool:
                asked.append(len(server.messages))
                await asyncio.sleep(0.05)  # a wait here (a window slot) holds nothing back
                return False

            with pytest.raises(Withdrawn):
                await p.deliver(env(1), no)
            assert p.relay_status()[0]["busy"] == 0

            async def yes() -> bool:
                asked.append(len(server.messages))
                return True

            return await p.deliver(env(2), yes)
        finally:
            await p.close()

    result = asyncio.run(main())
    assert asked == [0, 0]
    assert result.outcome is Outcome.SENT
    # The withdrawn message never arrived; the next one did, once, on a new connection.
    assert server.count_by_recipient() == {"r2@example.com": 1}
    assert server.connections == 2


def test_ready_is_not_asked_when_the_relay_refuses_before_data(server: SmtpServer) -> None:
    server.rule("nobody@example.com", "550 5.1.1 User unknown", stage="rcpt")
    asked: list[str] = []

    async def ready() -> bool:
        asked.append("asked")
        return True

    async def main() -> Result:
        p = pool([server.relay])
        try:
            return await p.deliver(env(1, "nobody@example.com"), ready)
        finally:
            await p.close()

    result = asyncio.run(main())
    assert result.outcome is Outcome.FAILED and asked == []


def test_server_closing_idle_connection_is_retried_transparently() -> None:
    # timeout=0.3: aiosmtpd drops idle sessions, as an MTA does after its idle timeout.
    with SmtpServer(timeout=0.3) as srv:
        async def main() -> list[Result]:
            p = pool([srv.relay], connections=1)
            try:
                first = await p.deliver(env(1))
                await asyncio.sleep(0.6)
                return [first, await p.deliver(env(2))]
            finally:
                await p.close()

        results = asyncio.run(main())
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
        assert srv.count_by_recipient() == {"r1@example.com": 1, "r2@example.com": 1}
        assert srv.connections == 2


def test_closed_pool_defers(server: SmtpServer) -> None:
    async def main() -> Result:
        p = pool([server.relay])
        await p.close()
        return await p.deliver(env(1))

    result = asyncio.run(main())
    assert result.outcome is Outcome.DEFERRED and "closed" in result.reply


def test_a_reply_in_latin_1_becomes_storable_text() -> None:
    """A relay answering in Latin-1 must not yield lone surrogates (aiosmtplib decodes
    with surrogateescape): the database refuses them and the outcome writer would
    retry that write forever."""
    async def main() -> Result:
        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 old.example.com ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 old.example.com\r\n")
                elif verb == b"RCPT":
                    writer.write(b"550 5.1.1 Empf\xe4nger unbekannt\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(session, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        p = pool([Relay("127.0.0.1", port)])
        try:
            return await p.deliver(env(1))
        finally:
            await p.close()
            server.close()
            await server.wait_closed()

    result = asyncio.run(main())
    assert (result.outcome, result.code, result.blames_recipient) == (Outcome.FAILED, 550, True)
    assert result.reply == "550 5.1.1 Empf\ufffdnger unbekannt"
    result.reply.encode("utf-8")  # no lone surrogates: storable
