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
* ``deliver(env, ready)``: DATA goes in two steps, and ``ready()`` is awaited
  between the relay's 354 and the body, the point of no return (the send
  worker takes its window slot and checks its fence there). When it says no,
  the connection is closed in the middle of DATA (an RSET after 354 would be
  message text; the relay discards a transaction without its final dot) and
  :class:`Withdrawn` is raised: nothing of the message can have been accepted.
  aiosmtplib's public ``SMTP.execute_command`` and ``SMTP.protocol`` (its
  ``write`` and ``read_response``) are enough for this; no private method.
* When no relay is available ``deliver()`` returns DEFERRED at once (code 0,
  or the last reply code seen in this call, reply starting "no relay
  available:") so the worker can back off instead of hanging.
* See :func:`classify_reply` for how reply codes become outcomes.
* **No SMTP PIPELINING** (RFC 2920), on purpose: aiosmtplib (5.1.3, the pinned
  ``<6`` line) cannot take it cleanly. Its ``SMTPProtocol`` parses replies only
  inside ``data_received()``, one per ``read_response()``, and *drops* bytes
  that arrive while no command awaits a reply or after the awaited reply was
  parsed but before it was collected ("so it can't be mis-paired"); a second
  reply in the same TCP segment stays in the buffer with nothing to parse it
  until more bytes come. Writing MAIL, RCPT and DATA at once would therefore
  lose replies or wait for the timeout depending on how the relay's answers
  are split into segments: a race, not a protocol (``read_response()``'s own
  docstring: "if multiple commands are written to the transport without
  awaiting, response data will be lost"). ``SMTP`` builds its
  ``SMTPProtocol`` itself, with no hook for another, so pipelining means our
  own SMTP client (TLS, STARTTLS, AUTH, replies) or patching the library's
  module globals. Neither is worth what it would save: two of the four replies
  a transaction waits for and two small socket writes. Profiled (one send
  worker, 22 KB messages, smtp-sink), a message's CPU goes mostly to the
  22 KB write itself, the line-end check and dot-stuffing below, the
  decompression and the event loop; a send worker is bound by its
  unconfirmed window (commit latency), which pipelining does not shorten.
  The per-reply classification below would stay exactly as it is (MAIL's
  reply, then RCPT's, then DATA's 354).

Relays of a smarthost or an ESP (``[relay NAME]``):

* **Groups.** An envelope names its relay group (its list's, "" = the
  default group: every relay without ``group``); it only ever goes to a
  relay of that group, so one customer's mail never leaves through another
  customer's IPs. A group with no relay defers the message with that reason.
* **Weighted choice**: smooth weighted round-robin (nginx's) among the
  group's healthy relays that have a free connection: with weights 3 and 1
  the sequence is A A B A ..., deterministic and spread out, and equal
  weights are plain round-robin.
* **TLS and AUTH** happen when a connection opens; a TLS failure (untrusted
  certificate, wrong host name, STARTTLS not offered) or a refused
  authentication sets the relay aside with the reason, like a refused
  connection: its messages are deferred, never failed, and nothing is sent
  before TLS is up (aiosmtplib raises before MAIL FROM). A "530
  authentication required" at MAIL FROM is the same misconfiguration.
* **Throttling** (:func:`sendsystem.smtpstatus.is_throttling`: 454, or a 4xx
  that says rate/throttle/too many) slows the relay rather than only
  setting it aside: the pool paces that relay at half the rate it had just
  measured for it, or its configured ``rate`` (at most one halving per
  SLOW_MIN_INTERVAL: sibling connections are refused together, and the new
  pace needs time to show), and the rate grows back by half every
  ``SLOW_RECOVER`` seconds without a throttling reply, so a full recovery
  from 1/8 takes about two minutes. The refused message was not accepted
  (a 4xx), so it is tried again at the slower pace.
* **Cluster-wide rate and daily quota** (``rate``, ``daily_quota``) are
  tokens claimed from the database by :class:`sendsystem.relaylimits.ClusterLimits`
  right before a transaction; a relay whose quota is used up is skipped
  until the next check (``QUOTA_RECHECK``) and its messages defer.
* **Idle connections**: one idle longer than the relay's ``idle_timeout``
  is closed and a new one opened (servers drop idle clients, often
  silently behind a NAT); one found closed at MAIL FROM is retried on a new
  connection. After any refused transaction the connection is RSET before
  reuse, or dropped when RSET fails, so a reused connection never answers
  "503 sender already specified".
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

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
from .ratelimit import _Bucket
from .smtpstatus import Cause, is_throttling, read_reply, refuses_sender_auth

log = logging.getLogger(__name__)

MAX_REPLY = 500
# Throttled relays: the paced rate grows by half after this many seconds
# without a throttling reply; at most one halving per SLOW_MIN_INTERVAL.
SLOW_RECOVER = 20.0
SLOW_MIN_INTERVAL = 5.0
SLOW_FLOOR = 0.2  # messages/s: a throttled relay is never paced slower
RATE_WINDOW = 10.0  # seconds over which a relay's current rate is measured
QUOTA_RECHECK = 60.0  # seconds a relay whose daily quota is used up is skipped


class RelayLimits(Protocol):
    """Cluster-wide limits (sendsystem.relaylimits.ClusterLimits implements it)."""

    async def take(self, relay: Relay, factor: float = 1.0) -> str | None:
        """Wait for the relay's rate (times ``factor`` while it throttles us); None: go;
        a reason: its daily quota is used up."""

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
    group: str = ""  # relay group of the message's list; "" = the default group
    message_id: str = ""  # its Message-ID header, recorded with the outcome ("" = none)


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


# What aiosmtplib's data() does to a message that does not already have CRLF line
# ends (its protocol module's LINE_ENDINGS_REGEX and PERIOD_REGEX, copied: they are
# not part of its API).
_LINE_ENDS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def _wire_body(data: bytes) -> bytes:
    """The DATA payload: CRLF line ends, dot-stuffed, ending in the final ``.``.

    aiosmtplib's data() normalises line ends and dot-stuffs with two regex passes
    (~220 us for 22 KB, a third of our CPU per message). Our composer already
    emits CRLF, so a count check and one bytes.replace (~55 us) do the same job;
    anything else gets aiosmtplib's treatment (same regexes, same result).
    """
    crlf = data.count(b"\r\n")
    if crlf != data.count(b"\n") or crlf != data.count(b"\r") or not data.endswith(b"\r\n"):
        data = _LINE_ENDS.sub(b"\r\n", data)
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        return _LEADING_DOT.sub(b"..", data) + b".\r\n"
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed[:1] == b".":
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


class Withdrawn(Exception):
    """``ready()`` said no after the relay's 354: the body was never sent, the
    connection was closed without the final ``.`` (so the relay discards the
    transaction) and nothing of the message can have been accepted."""


# Called after the relay's 354 reply to DATA, right before the body: True lets it go.
Ready = Callable[[], Awaitable[bool]]


async def _data(smtp: aiosmtplib.SMTP, data: bytes, timeout: float,
                ready: Ready | None = None) -> SMTPResponse:
    """DATA in two steps: the command and its 354, then (once ``ready()`` agrees) the
    body and its final reply. Between the two nothing the relay could accept has
    been sent: ``ready()`` may wait there (the send worker takes its slot of the
    unconfirmed window there, so the MAIL/RCPT/DATA round trips overlap the wait
    for an earlier message's commit). When it says no, the connection is closed
    in the middle of DATA, which is the only way to abandon a transaction after
    354 (an RSET now would be message text), and :class:`Withdrawn` is raised.
    """
    payload = _wire_body(data)
    response = await smtp.execute_command(b"DATA")
    if response.code != 354:
        raise SMTPDataError(response.code, response.message)
    if ready is not None and not await ready():
        smtp.close()
        raise Withdrawn
    protocol = smtp.protocol
    if protocol is None:
        raise SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(payload)
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
    __slots__ = ("smtp", "used_at", "uses")

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.uses = 0
        self.used_at = time.monotonic()


class _RelayState:
    """Mutable bookkeeping for one relay (owned by the pool's event loop)."""

    def __init__(self, relay: Relay, connections: int, per_connection: int) -> None:
        self.relay = relay
        self.name = str(relay)
        self.connections = relay.connections or connections
        self.per_connection = relay.messages_per_connection or per_connection
        self.idle: list[_Conn] = []
        self.busy = 0
        self.failures = 0  # consecutive set-asides without a served MAIL FROM since
        self.down_until = 0.0  # time.monotonic() before which the relay is not used
        self.quota_until = 0.0  # time.monotonic() before which its quota is used up
        self.last_error = ""
        self.opened = 0
        self.counts = {Outcome.SENT: 0, Outcome.DEFERRED: 0, Outcome.FAILED: 0}
        self.current_weight = 0.0  # smooth weighted round-robin
        self.sent_at: deque[float] = deque()  # monotonic times of 250s in RATE_WINDOW
        # Throttling: the paced rate, when it ends, and the pacer.
        self.slow_rate: float | None = None
        self.slow_full = 0.0
        self.slowed_at = 0.0
        self.pace: _Bucket | None = None
        self.throttled = 0

    def rate(self, now: float) -> float:
        """Messages/s this pool got accepted by the relay over the last RATE_WINDOW."""
        while self.sent_at and self.sent_at[0] < now - RATE_WINDOW:
            self.sent_at.popleft()
        if not self.sent_at:
            return 0.0
        return len(self.sent_at) / max(1.0, min(RATE_WINDOW, now - self.sent_at[0]))

    def health(self, now: float) -> str:
        if self.down_until > now:
            return "set aside"
        if self.quota_until > now:
            return "quota reached"
        if self.slow_rate is not None:
            return "slowed"
        return "ok"


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
        limits: RelayLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not relays:
            raise ValueError("DeliveryPool needs at least one relay")
        if connections < 1 or messages_per_connection < 1:
            raise ValueError("connections and messages_per_connection must be at least 1")
        self._relays = [_RelayState(r, connections, messages_per_connection) for r in relays]
        self._connections = connections
        self._per_connection = messages_per_connection
        self._limits = limits
        self._clock = clock
        self._timeout = timeout
        self._helo = helo or None
        self._backoff_min = relay_backoff_min
        self._backoff_max = max(relay_backoff_max, relay_backoff_min)
        # False: plain SMTP (a local Postfix); None: STARTTLS when offered; True: required.
        self._start_tls = start_tls
        self._validate_certs = validate_certs
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        # A whole relay list down, or several 421s in a row, is worth several tries.
        self._max_attempts = 2 * len(self._relays) + 1
        self._groups = {r.group for r in relays}

    # -- public API -------------------------------------------------------------------

    async def deliver(self, env: Envelope, ready: Ready | None = None) -> Result:
        """Send one message; returns its Result and never raises for SMTP/network trouble.

        ``ready``: awaited after the relay's 354, right before the body is sent (the
        point of no return); False withdraws the message: :class:`Withdrawn` is
        raised and nothing of it was sent. Not retried here: the caller decides."""
        last: tuple[int, str, str] = (0, "", "")  # code, reply, relay of the last failure
        if env.group not in self._groups:
            return Result(env.key, Outcome.DEFERRED, 0, _reply(
                0, f"no relay available: no relay in group {env.group or '(default)'!r}; "
                   "add one ([relay NAME] group = ...) or change the list's group "
                   "(sendsystem list set NAME --relays GROUP)"), "", False)
        for _ in range(self._max_attempts):
            state = await self._acquire(env.group)
            if state is None:
                break
            try:
                result = await self._paced_attempt(state, env, ready)
            finally:
                state.busy -= 1
                self._wake_one()
            if isinstance(result, Result):
                state.counts[result.outcome] += 1
                if result.outcome is Outcome.SENT:
                    state.sent_at.append(self._clock())
                return result
            last = result
        return self._unavailable(env, last)

    async def _paced_attempt(self, state: _RelayState, env: Envelope,
                             ready: Ready | None = None) -> Result | tuple[int, str, str]:
        """Wait for the relay's throttling pace and cluster-wide limits, then one try."""
        clustered = self._limits is not None and state.relay.limited
        factor = 1.0
        if state.slow_rate is not None:
            self._recover(state)
        if state.slow_rate is not None:
            if clustered and state.relay.rate:
                # The cluster-wide bucket refills at the slower rate for our claims.
                factor = state.slow_rate / state.relay.rate
            elif state.pace is not None:
                wait = state.pace.reserve(1)
                if wait > 0:
                    await asyncio.sleep(wait)
        if self._limits is not None and state.relay.limited:
            refused = await self._limits.take(state.relay, factor)
            if refused is not None:
                if state.quota_until <= self._clock():
                    log.warning("relay %s: %s", state.name, refused)
                state.quota_until = self._clock() + QUOTA_RECHECK
                state.last_error = refused
                self._wake_all()  # waiters for this relay must look elsewhere or give up
                return 0, refused, state.name
        return await self._attempt(state, env, ready)

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
                "group": s.relay.group,
                "host": s.relay.host,
                "port": s.relay.port,
                "health": s.health(now),
                "rate": round(s.rate(now), 3),
                "slow_rate": s.slow_rate,
                "throttled": s.throttled,
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

    async def _acquire(self, group: str = "") -> _RelayState | None:
        """Take a transaction slot on a healthy relay of ``group`` with a free connection,
        by smooth weighted round-robin; None if none of the group is up."""
        loop = asyncio.get_running_loop()
        relays = self._relays
        while not self._closed:
            now = time.monotonic()
            clock_now = self._clock()
            best: _RelayState | None = None
            total = 0.0
            healthy = False
            for s in relays:
                if s.relay.group != group or s.down_until > now or s.quota_until > clock_now:
                    continue
                healthy = True
                # A relay coming back from a set-aside is probed with one connection.
                if (s.connections if s.failures == 0 else 1) - s.busy <= 0:
                    continue
                s.current_weight += s.relay.weight
                total += s.relay.weight
                if best is None or s.current_weight > best.current_weight:
                    best = s
            if best is not None:
                best.current_weight -= total
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
            if s.relay.group != env.group:
                continue
            wait = s.down_until - now
            state = f"set aside, retry in {wait:.0f}s" if wait > 0 else "up"
            if wait <= 0 and s.quota_until > self._clock():
                state = "daily quota used up"
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

    # -- throttling -------------------------------------------------------------------

    def _slow(self, state: _RelayState, reason: str) -> None:
        """A throttling reply: pace the relay at half its recent rate (module docstring)."""
        now = self._clock()
        state.throttled += 1
        state.last_error = reason
        if state.slow_rate is not None and now - state.slowed_at < SLOW_MIN_INTERVAL:
            return  # sibling connections refused at the same moment: one halving
        if state.slow_rate is None:
            # Its configured rate, else the measured one (at least one message/s per
            # connection: right after start-up there is little to measure).
            base = state.relay.rate or max(state.rate(now), float(state.connections))
            state.slow_full = base
        else:
            base = state.slow_rate
        state.slow_rate = max(SLOW_FLOOR, base / 2)
        state.slowed_at = now
        if state.pace is None:
            state.pace = _Bucket(state.slow_rate, 1.0, self._clock)
        else:
            state.pace.rate = state.slow_rate
        log.warning("relay %s throttles (%s): paced at %.1f msgs/s", state.name, reason,
                    state.slow_rate)

    def _recover(self, state: _RelayState) -> None:
        assert state.slow_rate is not None
        now = self._clock()
        while state.slow_rate is not None and now - state.slowed_at >= SLOW_RECOVER:
            state.slowed_at += SLOW_RECOVER
            state.slow_rate *= 1.5
            if state.slow_rate >= state.slow_full:
                log.info("relay %s: no longer slowed", state.name)
                state.slow_rate, state.pace = None, None
            elif state.pace is not None:
                state.pace.rate = state.slow_rate

    # -- connections ------------------------------------------------------------------

    def _tls_context(self, relay: Relay) -> ssl.SSLContext:
        if not relay.verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(
            cafile=str(relay.ca_file) if relay.ca_file is not None else None)

    async def _open(self, state: _RelayState) -> _Conn:
        relay = state.relay
        helo = relay.helo or self._helo
        if helo is None:
            # socket.getfqdn() may block on DNS: resolve once, off the loop.
            self._helo = helo = await asyncio.to_thread(socket.getfqdn)
        if relay.name:
            # A named relay says what it wants; nothing is sent before TLS is up.
            smtp = aiosmtplib.SMTP(
                hostname=relay.host, port=relay.port, timeout=self._timeout,
                local_hostname=helo, use_tls=relay.tls == "tls",
                start_tls=relay.tls == "starttls",
                tls_context=self._tls_context(relay) if relay.tls != "none" else None,
            )
        else:
            smtp = aiosmtplib.SMTP(
                hostname=relay.host, port=relay.port, timeout=self._timeout,
                local_hostname=helo, start_tls=self._start_tls,
                validate_certs=self._validate_certs,
            )
        stage = "connect"
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except SMTPHeloError:
                    if not smtp.is_connected:
                        raise
                    await smtp.helo()
            if relay.username:
                stage = "authentication"
                await self._login(smtp, relay)
        except SMTPResponseException as exc:
            smtp.close()
            what = "authentication failed: " if stage == "authentication" else ""
            raise _ConnectFailed(exc.code, _reply(0, what + _reply(exc.code, exc.message))) \
                from None
        except (SMTPException, OSError) as exc:
            smtp.close()
            if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError) or \
                    "STARTTLS" in str(exc) or "TLS" in str(exc):
                stage = "TLS"
            raise _ConnectFailed(0, _reply(0, f"{stage}: {exc}")) from None
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

    async def _login(self, smtp: aiosmtplib.SMTP, relay: Relay) -> None:
        if relay.auth == "plain":
            await smtp.auth_plain(relay.username, relay.password)
        elif relay.auth == "login":
            await smtp.auth_login(relay.username, relay.password)
        else:
            await smtp.login(relay.username, relay.password)

    async def _attempt(self, state: _RelayState, env: Envelope,
                       ready: Ready | None = None) -> Result | tuple[int, str, str]:
        """One try on ``state``: a Result, or (code, reply, relay) when nothing was sent."""
        conn: _Conn | None = None
        now = time.monotonic()
        while state.idle:
            conn = state.idle.pop()
            if conn.smtp.is_connected and now - conn.used_at < state.relay.idle_timeout:
                break
            if conn.smtp.is_connected:
                self._retire(conn)  # idle too long: the server may have dropped it
            else:
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
            result, keep = await self._transact(state, conn, env, reused, ready)
            return result
        finally:
            conn.used_at = time.monotonic()
            if not keep or self._closed:
                conn.smtp.close()  # broken, or close() has already collected the QUITs
            elif conn.uses < state.per_connection:
                state.idle.append(conn)
            else:
                self._retire(conn)

    async def _transact(self, state: _RelayState, conn: _Conn, env: Envelope, reused: bool,
                        ready: Ready | None = None
                        ) -> tuple[Result | tuple[int, str, str], bool]:
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
            response = await _data(smtp, env.data, self._timeout, ready)
        except SMTPResponseException as exc:
            code, text = exc.code, _reply(exc.code, exc.message)
            if code == 421:
                # The relay is going away and did not take this message: try another.
                if is_throttling(code, exc.message):
                    self._slow(state, text)
                self._set_aside(state, text)
                return (code, text, state.name), False
            if is_throttling(code, exc.message):
                # Refused for our pace, not for the message: slower, and again.
                self._slow(state, text)
                return (code, text, state.name), await self._rset(smtp)
            if stage == "MAIL FROM" and refuses_sender_auth(code, exc.message):
                # "530 Authentication required": the relay's settings, not the message.
                self._set_aside(state, f"authentication required: {text}")
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
