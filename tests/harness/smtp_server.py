"""A real, in-process SMTP server for tests (aiosmtpd), with a recording handler.

Usage from a plain (sync) pytest test::

    with SmtpServer() as srv:
        srv.rule("nobody@example.com", "550 5.1.1 User unknown")
        srv.rule("later@example.com", "451 4.3.0 try later", times=1)
        ... deliver to srv.host, srv.port (or srv.relay) ...
        assert srv.count_by_recipient()["a@example.com"] == 1

The Controller runs its own event loop in a thread, so the code under test may
run its own loop (asyncio.run) in the test's thread. Rules are matched on the
exact recipient address (case-insensitive) at RCPT time, or at end of DATA
with ``stage="data"``. A "421 ..." reply also closes the connection, as a
real MTA does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from sendsystem.config import Relay


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    connection: int  # ordinal of the SMTP session (1 = first EHLO/HELO seen)
    at: float = 0.0  # time.time() when the message was accepted (comparable with logs)


@dataclass
class Rule:
    reply: str
    times: int | None = None  # answer ``reply`` this many times, then accept; None = always
    stage: str = "rcpt"  # "rcpt" or "data"
    delay: float = 0.0  # seconds to wait before answering (to provoke client timeouts)
    used: int = 0


@dataclass
class RecordingHandler:
    """aiosmtpd handler that keeps every accepted message and applies reply rules."""

    messages: list[ReceivedMessage] = field(default_factory=list)
    rules: dict[str, Rule] = field(default_factory=dict)
    connections: int = 0  # sessions that sent EHLO or HELO
    # Every MAIL FROM seen: (address, TLS was up, the session had authenticated as)
    mail_commands: list[tuple[str, bool, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _next(self, address: str, stage: str) -> Rule | None:
        with self.lock:
            rule = self.rules.get(address.lower())
            if rule is None or rule.stage != stage:
                return None
            if rule.times is not None and rule.used >= rule.times:
                return None
            rule.used += 1
            return rule

    async def _apply(self, server: SMTP, rule: Rule) -> str:
        if rule.delay:
            await asyncio.sleep(rule.delay)
        if rule.reply.startswith("421"):
            # Close right after the reply has been written (push happens first).
            transport = server.transport
            if transport is not None:
                asyncio.get_running_loop().call_soon(transport.close)
        return rule.reply

    def _connected(self, session: Session, hostname: str) -> None:
        session.host_name = hostname
        with self.lock:
            self.connections += 1
            session.sendsystem_connection = self.connections  # type: ignore[attr-defined]

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        self._connected(session, hostname)
        return responses

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        self._connected(session, hostname)
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        user = str(session.auth_data) if session.authenticated else None
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None)
        with self.lock:
            self.mail_commands.append((address, tls, user))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        rule = self._next(address, "rcpt")
        if rule is not None:
            return await self._apply(server, rule)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        for address in envelope.rcpt_tos:
            rule = self._next(address, "data")
            if rule is not None:
                return await self._apply(server, rule)
        data = envelope.original_content or b""
        with self.lock:
            self.messages.append(ReceivedMessage(
                envelope.mail_from or "", tuple(envelope.rcpt_tos), bytes(data),
                getattr(session, "sendsystem_connection", 0), time.time()))
            queue_id = f"T{len(self.messages):06d}"
        return f"250 2.0.0 Ok: queued as {queue_id}"


class _AnyPortController(Controller):
    """Controller that may bind port 0: learn the real port before the self-test connect."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpServer:
    """An aiosmtpd server on 127.0.0.1 (free port) recording what it accepts."""

    def __init__(self, port: int = 0, data_size_limit: int = 64 * 1024 * 1024,
                 **smtp_kwargs: Any) -> None:
        self.handler = RecordingHandler()
        self._controller = _AnyPortController(
            self.handler, hostname="127.0.0.1", port=port,
            data_size_limit=data_size_limit, **smtp_kwargs)
        self._started = False

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> SmtpServer:
        self._controller.start()
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- address ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self._controller.port)

    @property
    def relay(self) -> Relay:
        return Relay(self.host, self.port)

    # -- behaviour and observations ---------------------------------------------------

    def rule(self, recipient: str, reply: str, times: int | None = None, *,
             stage: str = "rcpt", delay: float = 0.0) -> None:
        """Answer ``reply`` for ``recipient`` (the first ``times`` times, or always)."""
        if stage not in ("rcpt", "data"):
            raise ValueError("stage must be 'rcpt' or 'data'")
        with self.handler.lock:
            self.handler.rules[recipient.lower()] = Rule(reply, times, stage, delay)

    def clear_rules(self) -> None:
        with self.handler.lock:
            self.handler.rules.clear()

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self.handler.lock:
            return list(self.handler.messages)

    @property
    def connections(self) -> int:
        with self.handler.lock:
            return self.handler.connections

    def count_by_recipient(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for message in self.messages:
            counts.update(message.rcpt_tos)
        return counts
