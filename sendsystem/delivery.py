"""SMTP delivery engine of the send worker: persistent connections to one or more relays.

The :class:`DeliveryPool` knows nothing of the database. The send worker hands
it :class:`Envelope` values (final wire bytes, one recipient each) and gets a
:class:`Result` back for each; ``deliver()`` never raises for SMTP or network
trouble, so the worker only has to record outcomes.

Decisions worth knowing:

* Up to ``connections`` persistent connections per relay, opened lazily and
  reused for ``messages_per_connection`` transactions, then retired with QUIT
  in the background (so the message that used it up is not held back).
* Load is spread over the healthy relays by most free slots, ties broken
  round-robin. A relay that refuses connections, times out on connect, greets
  or answers with 421, or fails EHLO is *set aside* with exponential back-off
  (``relay_backoff_min`` doubling up to ``relay_backoff_max``). When its time
  comes it is probed with a single connection; full concurrency returns once a
  MAIL FROM succeeds on it. Failures seen while it is already set aside do not
  lengthen the back-off (the other connections fail at the same moment).
* Retrying inside ``deliver()`` happens only while nothing can have been
  accepted: a failed connect, a 421 (the server says it did not take the
  message), or a reused idle connection that turns out to be closed before
  MAIL FROM was answered. A disconnect or timeout after the message body was
  sent is reported as DEFERRED ("delivery status unknown") and never retried
  here: once DATA may have been accepted we must not send again on our own.
* When no relay is available ``deliver()`` returns DEFERRED at once (code 0,
  or the last reply code seen in this call, reply starting "no relay
  available:") so the worker can back off instead of hanging.
* See :func:`classify_reply` for how reply codes become outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.email import parse_address

from .config import Relay
from .smtpstatus import Cause, read_reply

log = logging.getLogger(__name__)

MAX_REPLY = 500

class Outcome(StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class Envelope:
    """One message for one recipient, ready for the wire."""

    key: int  # message id, echoed in the Result
    sender: str  # VERP envelope sender (MAIL FROM)
    recipient: str  # RCPT TO
    data: bytes  # final message bytes with CRLF line ends (dot-stuffing is done here)


@dataclass(frozen=True)
class Result:
    key: int
    outcome: Outcome
    code: int  # SMTP reply code; 0 when there was no reply (timeout, refused, disconnect)
    reply: str  # one line, at most MAX_REPLY characters, e.g. "250 2.0.0 Ok: queued as ABC"
    relay: str  # "host:port" that answered (or was tried last); "" if none was tried
    blames_recipient: bool  # True when the address itself is bad (hard bounce material)


def classify_reply(code: int, text: str) -> tuple[Outcome, bool]:
    """Map an SMTP reply to (outcome, blames_recipient).

    The reply is read by :func:`sendsystem.smtpstatus.read_reply`, the same
    reading the bounce classifier gives a DSN; only the mapping is ours:

    * 2xx -> SENT.
    * 4xx, and anything unexpected (0, 1xx, 3xx) -> DEFERRED: try again later.
    * 5xx -> FAILED, except a full mailbox (5.2.2, or quota/storage wording
      with a generic code): many providers report a temporarily full mailbox
      as 5xx, so it is DEFERRED and the worker's max_age decides.
    * blames_recipient is True only when the reply says the address is bad
      (cause ADDRESS: 5.1.x except 5.1.7/5.1.8, 5.2.1, or "user unknown"
      wording on a generic 550/551/553). Policy and spam blocks (5.7.x, or
      block/spam wording with a generic code) never blame the recipient.
    """
    if 200 <= code < 300:
        return Outcome.SENT, False
    if not 500 <= code < 600:
        return Outcome.DEFERRED, False
    cause = read_reply(text, code=code).cause
    if cause is Cause.FULL:
        return Outcome.DEFERRED, False
    return Outcome.FAILED, cause is Cause.ADDRESS


def _reply(code: int, message: str) -> str:
    """One line of at most MAX_REPLY characters that the database can store.

    aiosmtplib decodes replies with ``surrogateescape``: a relay answering in
    Latin-1 ("Empfänger unbekannt") yields lone surrogates, which no UTF-8
    connection can send, so the outcome writer would retry that write forever.
    Such bytes become U+FFFD here.
    """
    text = f"{code} {message}" if code else message
    if not text.isascii():
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "\n" in text or "\r" in text:
        text = " ".join(text.split())
    return text[:MAX_REPLY]


def reason_line(what: str, exc: BaseException, suffix: str = "") -> str:
    """One line for the reply column when there is no SMTP reply to store: what failed
    and the exception, at most MAX_REPLY characters."""
    text = " ".join(f"{what}: {type(exc).__name__}: {exc} {suffix}".split())
    return text[:MAX_REPLY]


# An address we can put between <> as is, without email.utils parsing (~20 us each).
_PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[^\s<>()\[\]\\,;:\"@]+")


def _mailbox(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL/RCPT; ValueError unless it is one bare, safe mailbox.

    aiosmtplib's own quoting would turn "x\\r\\nRCPT TO:<y@z>" or "Name <y@z>" into
    <y@z>, i.e. silently mail someone else: we refuse anything that is not
    already a bare address.
    """
    if address and not _PLAIN_ADDRESS.fullmatch(address) and parse_address(address) != address:
        raise ValueError(f"{address!r} is not a bare mailbox address")
    return b"<" + address.encode(encoding) + b">"


async def _mail(smtp: aiosmtplib.SMTP, sender: str, options: list[str], encoding: str) -> None:
    args = [b"FROM:" + _mailbox(sender, encoding)]
    args.extend(option.encode("ascii") for option in options)
    response = await smtp.execute_command(b"MAIL", *args)
    if response.code != 250:
        raise SMTPSenderRefused(response.code, response.message, sender)


async def _rcpt(smtp: aiosmtplib.SMTP, recipient: str, encoding: str) -> None:
    response = await smtp.execute_command(b"RCPT", b"TO:" + _mailbox(recipient, encoding))
    if response.code not in (250, 251):
        raise SMTPRecipientRefused(response.code, response.message, recipient)


async def _data(smtp: aiosmtplib.SMTP, data: bytes, timeout: float) -> SMTPResponse:
    """DATA for a message that already has CRLF line ends.

    aiosmtplib's data() normalises line ends and dot-stuffs with two regex passes
    (~220 us for 22 KB, a third of our CPU per message). Our composer already
    emits CRLF, so a count check and one bytes.replace (~55 us) do the same job;
    anything else falls back to aiosmtplib.
    """
    crlf = data.count(b"\r\n")
    if crlf != data.count(b"\n") or crlf != data.count(b"\r") or not data.endswith(b"\r\n"):
        return await smtp.data(data)
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed[:1] == b".":
        stuffed = b"." + stuffed
    response = await smtp.execute_command(b"DATA")
    if response.code != 354:
        raise SMTPDataError(response.code, response.message)
    protocol = smtp.protocol
    if protocol is None:
        raise SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(stuffed + b".\r\n")
        response = await protocol.read_response(timeout=timeout)
    except (SMTPServerDisconnected, SMTPTimeoutError):
        smtp.close()  # as aiosmtplib does: the reply stream is out of step now
        raise
    if response.code != 250:
        raise SMTPDataError(response.code, response.message)
    return response


class _ConnectFailed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Conn:
    __slots__ = ("smtp", "uses")

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.uses = 0


class _RelayState:
    """Mutable bookkeeping for one relay (owned by the pool's event loop)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.name = str(relay)
        self.idle: list[_Conn] = []
        self.busy = 0
        self.failures = 0  # consecutive set-asides without a served MAIL FROM since
        self.down_until = 0.0  # time.monotonic() before which the relay is not used
        self.last_error = ""
        self.opened = 0
        self.counts = {Outcome.SENT: 0, Outcome.DEFERRED: 0, Outcome.FAILED: 0}


class DeliveryPool:
    """Persistent SMTP connections to a set of relays; see the module docstring.

    Create and use it inside one running event loop. ``deliver()`` may be
    called from many tasks at once; at most ``connections`` transactions run
    per healthy relay and the rest wait for a free connection.
    """

    def __init__(
        self,
        relays: Sequence[Relay],
        *,
        connections: int,
        messages_per_connection: int,
        timeout: float,
        helo: str | None = None,
        relay_backoff_min: float = 5.0,
        relay_backoff_max: float = 300.0,
        start_tls: bool | None = False,
        validate_certs: bool = True,
    ) -> None:
        if not relays:
            raise ValueError("DeliveryPool needs at least one relay")
        if connections < 1 or messages_per_connection < 1:
            raise ValueError("connections and messages_per_connection must be at least 1")
        self._relays = [_RelayState(r) for r in relays]
        self._connections = connections
        self._per_connection = messages_per_connection
        self._timeout = timeout
        self._helo = helo or None
        self._backoff_min = relay_backoff_min
        self._backoff_max = max(relay_backoff_max, relay_backoff_min)
        # False: plain SMTP (a local Postfix); None: STARTTLS when offered; True: required.
        self._start_tls = start_tls
        self._validate_certs = validate_certs
        self._rr = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        # A whole relay list down, or several 421s in a row, is worth several tries.
        self._max_attempts = 2 * len(self._relays) + 1

    # -- public API -------------------------------------------------------------------

    async def deliver(self, env: Envelope) -> Result:
        """Send one message; returns its Result and never raises for SMTP/network trouble."""
        last: tuple[int, str, str] = (0, "", "")  # code, reply, relay of the last failure
        for _ in range(self._max_attempts):
            state = await self._acquire()
            if state is None:
                break
            try:
                result = await self._attempt(state, env)
            finally:
                state.busy -= 1
                self._wake_one()
            if isinstance(result, Result):
                state.counts[result.outcome] += 1
                return result
            last = result
        return self._unavailable(env, last)

    async def close(self) -> None:
        """QUIT every idle connection and wait for retiring ones; later deliver() defers."""
        self._closed = True
        self._wake_all()
        for state in self._relays:
            idle, state.idle = state.idle, []
            for conn in idle:
                self._retire(conn)
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def relay_status(self) -> list[dict[str, object]]:
        """One dict per relay for logs and status: health, back-off, counters."""
        now = time.monotonic()
        out: list[dict[str, object]] = []
        for s in self._relays:
            down = s.down_until > now
            out.append({
                "relay": s.name,
                "host": s.relay.host,
                "port": s.relay.port,
                "up": not down,
                "retry_at": time.time() + (s.down_until - now) if down else None,
                "failures": s.failures,
                "last_error": s.last_error,
                "busy": s.busy,
                "idle": len(s.idle),
                "connections_opened": s.opened,
                "sent": s.counts[Outcome.SENT],
                "deferred": s.counts[Outcome.DEFERRED],
                "failed": s.counts[Outcome.FAILED],
            })
        return out

    # -- slots ------------------------------------------------------------------------

    async def _acquire(self) -> _RelayState | None:
        """Take a transaction slot on the least busy healthy relay; None if none is up."""
        loop = asyncio.get_running_loop()
        relays = self._relays
        n = len(relays)
        while not self._closed:
            now = time.monotonic()
            best: _RelayState | None = None
            best_free = 0
            healthy = False
            for i in range(n):
                s = relays[(self._rr + i) % n]
                if s.down_until > now:
                    continue
                healthy = True
                # A relay coming back from a set-aside is probed with one connection.
                free = (self._connections if s.failures == 0 else 1) - s.busy
                if free > best_free:
                    best, best_free = s, free
            if best is not None:
                self._rr = (self._rr + 1) % n
                best.busy += 1
                return best
            if not healthy:
                return None
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                # If we had been woken, pass the wake-up on so no slot goes unused.
                if fut.done() and not fut.cancelled():
                    self._wake_one()
                else:
                    self._waiters.remove(fut)
                raise
        return None

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _unavailable(self, env: Envelope, last: tuple[int, str, str]) -> Result:
        now = time.monotonic()
        parts = []
        for s in self._relays:
            wait = s.down_until - now
            state = f"set aside, retry in {wait:.0f}s" if wait > 0 else "up"
            parts.append(f"{s.name} {state}" + (f" ({s.last_error})" if s.last_error else ""))
        if self._closed:
            parts = ["delivery pool closed"]
        code, _, relay = last
        return Result(env.key, Outcome.DEFERRED, code,
                      _reply(0, "no relay available: " + "; ".join(parts)), relay, False)

    def _set_aside(self, state: _RelayState, reason: str) -> None:
        now = time.monotonic()
        state.last_error = reason
        if state.down_until > now:
            return  # already set aside by a sibling connection failing at the same time
        state.failures += 1
        delay = min(self._backoff_max, self._backoff_min * 2 ** min(state.failures - 1, 30))
        state.down_until = now + delay
        log.warning("relay %s set aside for %.0fs (failure %d): %s",
                    state.name, delay, state.failures, reason)
        idle, state.idle = state.idle, []
        for conn in idle:
            conn.smtp.close()
        self._wake_all()

    # -- connections ------------------------------------------------------------------

    async def _open(self, state: _RelayState) -> _Conn:
        if self._helo is None:
            # socket.getfqdn() may block on DNS: resolve once, off the loop.
            self._helo = await asyncio.to_thread(socket.getfqdn)
        smtp = aiosmtplib.SMTP(
            hostname=state.relay.host, port=state.relay.port, timeout=self._timeout,
            local_hostname=self._helo, start_tls=self._start_tls,
            validate_certs=self._validate_certs,
        )
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except SMTPHeloError:
                    if not smtp.is_connected:
                        raise
                    await smtp.helo()
        except SMTPResponseException as exc:
            smtp.close()
            raise _ConnectFailed(exc.code, _reply(exc.code, exc.message)) from None
        except (SMTPException, OSError) as exc:
            smtp.close()
            raise _ConnectFailed(0, _reply(0, f"connect: {exc}")) from None
        state.opened += 1
        log.debug("relay %s: connection opened", state.name)
        return _Conn(smtp)

    def _retire(self, conn: _Conn) -> None:
        """QUIT in the background; the message that used the connection up is done."""
        task = asyncio.get_running_loop().create_task(self._quit(conn.smtp))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quit(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=min(self._timeout, 10.0))
        except (SMTPException, OSError):
            pass
        finally:
            smtp.close()

    # -- one transaction --------------------------------------------------------------

    async def _attempt(self, state: _RelayState, env: Envelope) -> Result | tuple[int, str, str]:
        """One try on ``state``: a Result, or (code, reply, relay) when nothing was sent."""
        conn: _Conn | None = None
        while state.idle:
            conn = state.idle.pop()
            if conn.smtp.is_connected:
                break
            conn.smtp.close()
            conn = None
        reused = conn is not None
        if conn is None:
            try:
                conn = await self._open(state)
            except _ConnectFailed as exc:
                self._set_aside(state, exc.reason)
                return exc.code, exc.reason, state.name
        keep = False
        try:
            result, keep = await self._transact(state, conn, env, reused)
            return result
        finally:
            if not keep or self._closed:
                conn.smtp.close()  # broken, or close() has already collected the QUITs
            elif conn.uses < self._per_connection:
                state.idle.append(conn)
            else:
                self._retire(conn)

    async def _transact(self, state: _RelayState, conn: _Conn, env: Envelope,
                        reused: bool) -> tuple[Result | tuple[int, str, str], bool]:
        """MAIL, RCPT, DATA on one connection: (Result or retry marker, keep connection)."""
        smtp = conn.smtp
        conn.uses += 1
        options: list[str] = []
        encoding = "ascii"
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(env.data)}")
        if not env.data.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (env.sender.isascii() and env.recipient.isascii()):
            if not smtp.supports_extension("smtputf8"):
                return self._result(env, Outcome.FAILED, 0,
                                    "relay does not offer SMTPUTF8 for a non-ASCII address",
                                    state, True), True
            options.append("SMTPUTF8")
            encoding = "utf-8"
        stage = "MAIL FROM"
        try:
            await _mail(smtp, env.sender, options, encoding)
            self._serving(state)
            stage = "RCPT TO"
            await _rcpt(smtp, env.recipient, encoding)
            stage = "DATA"
            response = await _data(smtp, env.data, self._timeout)
        except SMTPResponseException as exc:
            code, text = exc.code, _reply(exc.code, exc.message)
            if code == 421:
                # The relay is going away and did not take this message: try another.
                self._set_aside(state, text)
                return (code, text, state.name), False
            self._serving(state)
            outcome, blame = classify_reply(code, exc.message)
            return self._result(env, outcome, code, text, state, blame), await self._rset(smtp)
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
            if stage == "MAIL FROM" and reused and not isinstance(exc, SMTPTimeoutError):
                # The relay closed an idle connection under us: nothing was sent.
                return (0, f"stale connection: {exc}", state.name), False
            unknown = " (delivery status unknown)" if stage == "DATA" else ""
            return self._result(env, Outcome.DEFERRED, 0, f"{stage}: {exc}{unknown}",
                                state, False), False
        except (SMTPException, ValueError) as exc:
            # ValueError: an address with control characters or that cannot be encoded.
            blame = stage == "RCPT TO"
            return self._result(env, Outcome.FAILED, 0, f"{stage}: {exc}", state, blame), \
                await self._rset(smtp)
        return Result(env.key, Outcome.SENT, response.code,
                      _reply(response.code, response.message), state.name, False), True

    def _serving(self, state: _RelayState) -> None:
        """The relay answered a transaction normally: end its probation, full concurrency."""
        if state.failures:
            state.failures = 0
            log.info("relay %s is back", state.name)
            self._wake_all()

    def _result(self, env: Envelope, outcome: Outcome, code: int, reply: str,
                state: _RelayState, blame: bool) -> Result:
        return Result(env.key, outcome, code, _reply(0, reply), state.name, blame)

    async def _rset(self, smtp: aiosmtplib.SMTP) -> bool:
        """Reset after a failed transaction; False when the connection is no longer usable."""
        if not smtp.is_connected:
            return False
        try:
            response = await smtp.rset()
        except (SMTPException, OSError):
            return False
        return response.code == 250
