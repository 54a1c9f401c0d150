"""`sendsystem send-worker`: the SendingSystem.

Takes its own batches of merged (and due deferred) messages and delivers
them over SMTP with the :class:`DeliveryPool`, ``connections`` per relay.
Each message's final bytes are the stored merge + the newsletter's
attachment parts (built once per newsletter) + the per-send headers
(Message-ID, Date, List-Unsubscribe, List-Unsubscribe-Post, List-Id,
Precedence), DKIM-signed when ``[dkim] key_file`` is set; the envelope
sender is a signed VERP address and the Message-ID is signed too
(:func:`sendsystem.tokens.message_id_header`), so a bounce or complaint
quoting either can be tied to this message and nobody else can forge one.

Nothing lost, duplicates bounded: every final outcome (a 250, a 5xx) is
appended to the local journal the moment it arrives and committed by the
group-commit writer (outcomes.py) as soon as its previous write is done.
On start-up the journal is replayed into the database before any new work,
so a worker restarted after SIGKILL does not resend what the relay already
accepted. Only messages on the wire at the instant of the kill (at most
``connections`` x relays) can go out twice.

Poison messages (Mailman's shunt, here "failed with the reason"): a message
that cannot be built -- a stored body that does not decompress, one that
:func:`finalize` refuses, a DKIM signing error, a newsletter whose
attachment parts cannot be built or are missing -- becomes ``failed`` with
"cannot build message: <why>" as its reply (reply code 0), recorded like
any final outcome (journal, then database), and the worker goes on. A
refused or unusable recipient address is failed by the delivery pool.
An exception escaping ``DeliveryPool.deliver()`` is a bug, not an SMTP
reply; the message is *deferred* with the reason and the usual back-off,
because we cannot know whether the relay saw the end of DATA: failing it
could drop a good message on a transient bug, marking it sent could hide
one never delivered, and dropping the row (as before) made the batch
fetch and send it again at once, forever. The back-off bounds the retries
and ``max_age`` ends them as ``failed``. So no row can crash the worker or
make it loop.

A journal that cannot be written (disk full, read-only, permissions) stops
the worker through :meth:`Runner.fail`: no new message is handed to the
pool, the ones on the wire finish, every outcome held in memory is
committed, then the batches are handed back and it exits with status 1
and the journal's message, which says what to fix.

Fenced: a worker sends only rows it currently owns (sendsystem/fencing.py
for the rule and why it holds).

* A row is ours while its batch is assigned to this worker (the batch id is
  the ownership token: a reclaimed batch is never assigned again and its
  rows go out under new batch ids). Fetching a chunk by batch id reads it;
  after a heartbeat gap or a reconnect the worker re-reads its batches
  before anything more goes to the relay, and drops what it holds for a
  batch that is gone: queued envelopes are discarded, not sent.
* The database calls of the batch loop run in a thread, so the event loop
  keeps deciding while a query hangs on a partition; the senders check the
  fence right before ``pool.deliver``: no completed heartbeat for
  ``heartbeat_timeout / 2`` (monotonic clock) and nothing new is handed to
  the relay. The balancer reclaims only after ``heartbeat_timeout``.
* The unconfirmed window: a 250 the database does not know yet is a
  duplicate if the batch is reclaimed (a peer cannot read this server's
  journal). So messages on the wire plus 250s not yet committed are at most
  ``connections`` x relays (``[sending] unconfirmed_window``): a sender's
  slot is freed when the outcome writer has committed its 250. Cut off from
  the database, a worker therefore stops after at most that many, and those
  are its only possible duplicates. The price: each slot waits for a commit
  (one send worker on one core, 8 connections: 2,145-2,541 -> 967-1,265
  msgs/s; a window of 2x: ~1,600; 4x: ~1,900).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..addresses import domain_of
from ..delivery import MAX_REPLY, DeliveryPool, Envelope, Outcome, Result
from ..errors import SendSystemError, TemporaryError
from ..fencing import Fence
from ..journal import JournalError
from ..merge import TemplateSource, compression_dictionary, decompress
from ..mime import Attachment, attachment_tail, finalize, safe_header_value
from ..ratelimit import AsyncRateLimiter, DomainRateLimiter
from ..ratemeter import RateMeter
from ..runner import Runner
from ..tokens import message_id_header, unsubscribe_token, verp_address
from .outcomes import OUTCOME_STATEMENTS, OutcomeWriter

log = logging.getLogger(__name__)

CHUNK = 500
T = TypeVar("T")


@dataclass
class NewsletterParts:
    """What every message of one newsletter shares, built once per worker."""

    newsletter_id: int
    list_id: int
    list_name: str
    zdict: bytes
    tail: bytes
    # Set when the shared parts cannot be built: every message of it fails with it.
    broken: str | None = None


class BuildError(Exception):
    """One message cannot be built; ``str()`` is the reason recorded for it."""


def newsletter_zdict(row: Mapping[str, Any]) -> bytes:
    """The stored compression dictionary (computed once by a sort worker's render child).

    A newsletter merged before schema version 3 has none stored: its
    messages were compressed with the dictionary derived from the template,
    so derive it the same way (renders customer code in this process, as
    before; only such old newsletters take this path).
    """
    if row["zdict"] is not None:
        return bytes(row["zdict"])
    return compression_dictionary(TemplateSource(subject=row["subject"], html=row["html"],
                                                 text=row["text"]))


def retry_delay(attempts: int, retry_min: float, retry_max: float) -> float:
    """Exponential back-off with +-20 % jitter, so retries of one batch spread out."""
    base = min(retry_max, retry_min * (2 ** min(attempts, 30)))
    return base * random.uniform(0.8, 1.2)


class SendWorker(Runner):
    role = "send"
    statements = ("my_batches", "my_backlog", "batch_mark_done", "newsletter_get",
                  "attachments_for_newsletter", "send_batch_messages",
                  "my_batches_hand_back_messages", "my_batches_mark_reclaimed",
                  "pending_for_role", *OUTCOME_STATEMENTS)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        s = self.config.sending
        self.secret = self.config.secret()
        self.meter = RateMeter()
        self.parts: dict[int, NewsletterParts | None] = {}
        # Rows handed to the pool whose outcome is not yet in the database:
        # the next fetch of their batch must not send them again.
        self.unflushed: dict[int, dict[str, Any]] = {}
        self.writer: OutcomeWriter | None = None
        self.signer = None
        if self.config.dkim.enabled:
            from ..dkim import DkimSigner
            assert self.config.dkim.key_file is not None
            self.signer = DkimSigner.from_file(self.config.dkim.domain,
                                               self.config.dkim.selector,
                                               self.config.dkim.key_file)
        self.loop = asyncio.new_event_loop()
        self.pool: DeliveryPool | None = None
        self.concurrency = s.connections * len(s.relays)
        self._date = ("", 0)
        # Fencing (module docstring).
        self.fence = Fence(self.config.balancer.heartbeat_timeout)
        self.owned: set[int] = set()        # batch ids last verified as ours
        self.batch_of: dict[int, int] = {}  # message id -> batch, for rows in `unflushed`
        self.fenced_since: float | None = None
        self.discarded = 0                  # queued messages dropped for reclaimed batches
        self._window: asyncio.Semaphore | None = None
        self.window = s.unconfirmed_window or self.concurrency
        # Each window slot waits for the outcome writer's commit, and CPython
        # hands the GIL to a waiting thread only every switch interval (5 ms)
        # while the event loop is busy: at 1 ms a send worker with a window
        # of 8 measured 697 -> 970-1,270 msgs/s (bench/pipeline.py --send-only).
        sys.setswitchinterval(0.001)
        self._db_lock: asyncio.Lock | None = None
        self._awaiting_commit: set[int] = set()  # 250s holding a window slot


    # -- lifecycle ----------------------------------------------------------------

    def setup(self) -> None:
        self.writer = OutcomeWriter(self.config, self.worker_id, self.options.name,
                                    self._abort_db_wait, self._journal_failed,
                                    on_written=self._on_written)
        self.writer.replay()
        self.writer.start()

    def _journal_failed(self, exc: JournalError) -> None:
        # May run in the writer thread: it only sets flags the event loop reads.
        self.fail(exc, "the send journal cannot be written")

    def shutdown(self) -> None:
        if self.writer is not None:
            self.writer.drain()
        with self.db.transaction():
            n = self.db.execute("my_batches_hand_back_messages", {"worker": self.worker_id})
            self.db.execute("my_batches_mark_reclaimed", {"worker": self.worker_id})
        if n:
            log.info("send worker %s handed back %d messages", self.options.name, n)
        if self.pool is not None:
            self.loop.run_until_complete(self.pool.close())
        self.loop.close()
        if self.writer is not None:
            self.writer.close()

    def heartbeat_fields(self) -> dict[str, object]:
        backlog = int(self.db.fetchval("my_backlog", {"worker": self.worker_id}) or 0)
        return {"rate": self.meter.rate(), "backlog": backlog}

    def drained(self) -> bool:
        return not self.db.fetchall("my_batches", {"worker": self.worker_id}) and \
            not self.db.fetchval("pending_for_role",
                                 {"states": ("queued", "merged", "deferred")})

    # -- fencing -----------------------------------------------------------------

    def heartbeat_done(self, started: float) -> None:
        # Heartbeat first, then the ownership check (sendsystem/fencing.py).
        if self.fence.heartbeat_done(started):
            self._verify_ownership()
        self._note_fence()

    def _verify_ownership(self) -> None:
        """Re-read which batches are ours; what we hold for any other is dropped."""
        generation = self.db.reconnects
        owned = {int(b["id"]) for b in self.db.fetchall("my_batches", {"worker": self.worker_id})}
        held = set(self.batch_of.values()) | self.owned
        self.owned = owned
        self.fence.verified(generation)
        lost = sorted(held - owned)
        if lost:
            n = sum(1 for b in self.batch_of.values() if b in lost)
            log.warning("send worker %s: batches %s were reclaimed while it was cut off from "
                        "the database; dropping what it still held for them (%d rows in hand; "
                        "250s already received are still recorded as sent)", self.options.name,
                        ", ".join(map(str, lost)), n)

    def _note_fence(self) -> None:
        """Log when the fence shuts and opens (for operators; the gate decides alone)."""
        generation = self.db.reconnects
        if self.fence.is_open(generation):
            if self.fenced_since is not None:
                log.warning("send worker %s: fence lifted after %.1fs (heartbeat and batch "
                            "ownership verified); sending again", self.options.name,
                            time.monotonic() - self.fenced_since)
                self.fenced_since = None
        elif self.fenced_since is None:
            self.fenced_since = time.monotonic()
            log.warning("send worker %s: self-fenced: %s; handing nothing to the relay "
                        "until the database answers", self.options.name,
                        self.fence.reason(generation))

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a call that uses ``self.db`` in a thread, one at a time: the event loop
        (and the fence in front of the relay) keeps going while a query hangs."""
        assert self._db_lock is not None
        async with self._db_lock:
            return await asyncio.to_thread(fn, *args)

    async def _keep_alive(self, done: asyncio.Event) -> None:
        """Heartbeat when due and re-verify after a reconnect; log fence changes.
        Its own task, so it never waits behind a full queue or a fenced sender.
        Ends when ``done`` is set, never in the middle of a database call (the
        thread would go on using the connection)."""
        while not done.is_set():
            try:
                if self.heartbeat_due():
                    await self._db(self.heartbeat)
                if self.fence.needs_verification(self.db.reconnects):
                    await self._db(self._verify_ownership)
            except TemporaryError as exc:
                log.warning("send worker %s: heartbeat failed (%s); retrying",
                            self.options.name, exc)
            except Exception:
                # Without heartbeats the fence stays shut: stop rather than hang.
                log.exception("send worker %s: heartbeat failed", self.options.name)
                self.request_stop("heartbeat failed")
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    async def _watch_fence(self, done: asyncio.Event) -> None:
        """Log fence changes as they happen, even while a heartbeat hangs."""
        while not done.is_set():
            self._note_fence()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    async def _gate(self, env: Envelope) -> bool:
        """Wait until ``env`` may go to the relay; False: drop it (its batch is not ours,
        or we are stopping while fenced). No await may follow a True before deliver()."""
        while True:
            if self.batch_of.get(env.key) not in self.owned:
                return False
            if self.fence.is_open(self.db.reconnects):
                return True
            if self.stopping:
                return False
            await asyncio.sleep(0.02)

    def _on_written(self, ids: list[int]) -> None:
        """Outcome-writer thread: these outcomes are committed."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: on the way out
            self.loop.call_soon_threadsafe(self._confirm, ids)

    def _confirm(self, ids: list[int]) -> None:
        assert self._window is not None
        for mid in ids:
            if mid in self._awaiting_commit:
                self._awaiting_commit.discard(mid)
                self._window.release()

    # -- the work ----------------------------------------------------------------

    def work(self) -> int:
        batches = self.db.fetchall("my_batches", {"worker": self.worker_id})
        if not batches:
            return 0
        self.owned = {int(b["id"]) for b in batches}
        return self.loop.run_until_complete(self._send_batches(batches))

    def make_pool(self) -> DeliveryPool:
        """The SMTP pool (inside the running loop); tests subclass it to inject faults."""
        s = self.config.sending
        return DeliveryPool(s.relays, connections=s.connections,
                            messages_per_connection=s.messages_per_connection,
                            timeout=s.timeout, helo=s.helo or None,
                            relay_backoff_min=s.relay_backoff_min,
                            relay_backoff_max=s.relay_backoff_max)

    async def _send_batches(self, batches: list[dict[str, Any]]) -> int:
        s = self.config.sending
        if self.pool is None:
            self.pool = self.make_pool()
            self.rate_limit = AsyncRateLimiter(self.options.max_rate, burst=1)
            self.domain_limit = DomainRateLimiter(s.domain_rates)
            self._window = asyncio.Semaphore(self.window)
        queue: asyncio.Queue[Envelope | None] = asyncio.Queue(maxsize=self.concurrency * 2)
        rows_by_id = self.unflushed
        writer = self.writer
        assert writer is not None
        senders = [asyncio.create_task(self._sender(queue, rows_by_id))
                   for _ in range(self.concurrency)]
        self._db_lock = asyncio.Lock()
        finished = asyncio.Event()
        keep_alive = asyncio.create_task(self._keep_alive(finished))
        watch = asyncio.create_task(self._watch_fence(finished))
        queued = 0
        discarded = self.discarded
        started = time.monotonic()

        def forget_written() -> None:
            for mid in writer.take_written():
                rows_by_id.pop(mid, None)
                self.batch_of.pop(mid, None)

        try:
            for batch in batches:
                bid = int(batch["id"])
                while not self.stopping and bid in self.owned:
                    forget_written()
                    rows = await self._db(self.db.fetchall, "send_batch_messages",
                                          {"batch": bid, "limit": CHUNK})
                    rows = [r for r in rows if int(r["id"]) not in rows_by_id]
                    if not rows:
                        # Everything fetched is delivered or in flight; once the
                        # queue drains and outcomes are written, the batch is done.
                        await queue.join()
                        await asyncio.to_thread(writer.drain)
                        forget_written()
                        if not await self._db(self.db.fetchall, "send_batch_messages",
                                              {"batch": bid, "limit": 1}):
                            await self._db(self.db.execute, "batch_mark_done", {"batch": bid})
                            break
                        continue
                    for nid in {int(r["newsletter_id"]) for r in rows} - self.parts.keys():
                        await self._db(self._parts, nid)
                    for row in rows:
                        if self.stopping or bid not in self.owned:
                            break
                        mid = int(row["id"])
                        rows_by_id[mid] = row
                        self.batch_of[mid] = bid
                        try:
                            env = self._build(row)
                        except BaseException:
                            # Database trouble: no outcome was recorded, so the row
                            # must be fetched again when the work is retried.
                            rows_by_id.pop(mid, None)
                            self.batch_of.pop(mid, None)
                            raise
                        if env is not None:
                            await queue.put(env)
                            queued += 1
                if self.stopping:
                    break
            await queue.join()
        finally:
            for _ in senders:
                await queue.put(None)
            await asyncio.gather(*senders, return_exceptions=True)
            finished.set()
            await asyncio.gather(keep_alive, watch, return_exceptions=True)
            await asyncio.to_thread(writer.drain)
            discarded = self.discarded - discarded
            if discarded:
                log.warning("send worker %s: discarded %d queued messages of reclaimed "
                            "batches (not sent)", self.options.name, discarded)
            self.meter.busy(queued - discarded, time.monotonic() - started)
        return queued - discarded

    async def _sender(self, queue: asyncio.Queue[Envelope | None],
                      rows: dict[int, dict[str, Any]]) -> None:
        assert self.pool is not None and self._window is not None
        while True:
            env = await queue.get()
            slot = False
            try:
                if env is None:
                    return
                if self.failure is None:
                    await self.rate_limit.acquire()
                    await self.domain_limit.acquire(domain_of(env.recipient))
                    await self._window.acquire()
                    slot = True
                if self.failure is not None:
                    # Stopping because it is unsafe to go on: not handed to the relay;
                    # the row stays merged/deferred and goes back with the batch.
                    rows.pop(env.key, None)
                    self.batch_of.pop(env.key, None)
                    continue
                if not await self._gate(env):
                    # Reclaimed (its row belongs to another worker now) or
                    # stopping while fenced (handed back at shutdown).
                    rows.pop(env.key, None)
                    self.batch_of.pop(env.key, None)
                    self.discarded += 1
                    continue
                try:
                    result = await self.pool.deliver(env)
                except Exception as exc:
                    # deliver() returns SMTP and network trouble as a Result: this is a
                    # bug. Deferred, not dropped (see the module docstring).
                    log.exception("message %s: unexpected error in delivery; deferred",
                                  env.key)
                    result = Result(env.key, Outcome.DEFERRED, 0,
                                    _reason("unexpected error in delivery", exc,
                                            "(delivery status unknown)"), "", False)
                if result.outcome is Outcome.SENT:
                    # The slot stays taken until the writer has committed the 250.
                    self._awaiting_commit.add(env.key)
                    slot = False
                # The row stays in `rows` until its outcome is in the database,
                # so the next fetch of the batch does not send it again.
                self._record(result, rows[env.key])
            except Exception as exc:
                # Recording failed (a bug): defer the row plainly rather than leave it
                # without an outcome, which would make its batch never finish.
                log.exception("message %s: cannot record its outcome; deferred",
                              getattr(env, "key", "?"))
                if env is not None:
                    if env.key in self._awaiting_commit:  # its 250 never reached the writer
                        self._awaiting_commit.discard(env.key)
                        slot = True
                    try:
                        self._defer_plainly(env.key, _reason("cannot record outcome", exc))
                    except Exception as again:
                        # The row stays in `rows`, so it is not fetched and sent again;
                        # stop, and it goes back with the batch.
                        log.exception("message %s: cannot defer it either", env.key)
                        self.fail(SendSystemError(
                            f"Cannot record the outcome of message {env.key} ({again}); "
                            "this is a bug: report it with this log."),
                            "an outcome cannot be recorded")
            finally:
                if slot:
                    self._window.release()
                queue.task_done()

    def _defer_plainly(self, mid: int, reason: str) -> None:
        assert self.writer is not None
        delay = retry_delay(0, self.config.sending.retry_min, self.config.sending.retry_max)
        self.writer.add("deferred", (mid, 0, reason, int(delay * 1_000_000)))

    def _record(self, result: Result, row: Mapping[str, Any]) -> None:
        assert self.writer is not None
        mid = result.key
        msgid = message_id_header(self.secret, mid, int(row["newsletter_id"]),
                                  self.config.sending.envelope_domain)
        reply = result.reply[:500]
        s = self.config.sending
        if result.outcome is Outcome.SENT:
            self.writer.add("sent", (mid, result.code, reply, msgid), (mid, "sent", reply))
        elif result.outcome is Outcome.FAILED or int(row["age"] or 0) > s.max_age:
            if result.outcome is Outcome.DEFERRED:
                reply = f"gave up after {int(row['attempts']) + 1} attempts: {reply}"[:500]
            bounce = None
            if result.blames_recipient:
                bounce = {"email": row["email"], "message_id": mid,
                          "subscriber_id": int(row["subscriber_id"]),
                          "status": _status(result.reply), "diagnostic": result.reply}
            self.writer.add("failed", (mid, result.code, reply, msgid), (mid, "failed", reply),
                            bounce)
        else:
            delay = retry_delay(int(row["attempts"]), s.retry_min, s.retry_max)
            self.writer.add("deferred", (mid, result.code, reply, int(delay * 1_000_000)))
        self.processed += 1

    # -- building the message ------------------------------------------------------

    def _parts(self, newsletter_id: int) -> NewsletterParts | None:
        if newsletter_id not in self.parts:
            # Database errors propagate (the runner retries the unit of work); only
            # building from what was read is this newsletter's own problem.
            row = self.db.fetchone("newsletter_get", {"id": newsletter_id})
            if row is None:
                self.parts[newsletter_id] = None
            else:
                atts = self.db.fetchall("attachments_for_newsletter", {"id": newsletter_id})
                self.parts[newsletter_id] = self._build_parts(row, atts)
        return self.parts[newsletter_id]

    def _build_parts(self, row: Mapping[str, Any],
                     atts: list[dict[str, Any]]) -> NewsletterParts:
        nid = int(row["id"])
        parts = NewsletterParts(newsletter_id=nid, list_id=int(row["list_id"]),
                                list_name=str(row["list_name"]), zdict=b"", tail=b"")
        try:
            parts.zdict = newsletter_zdict(row)
            for a in atts:
                data = a["data"]
                if data is None or len(data) != int(a["size"]):
                    got = "no data" if data is None else f"{len(data)} bytes"
                    raise BuildError(f"attachment {a['filename']!r} (id {a['id']}) is corrupt: "
                                     f"{got} stored, {a['size']} expected")
            parts.tail = attachment_tail(nid, [
                Attachment(a["filename"], a["content_type"], a["data"]) for a in atts])
        except BuildError as exc:
            parts.broken = f"newsletter {nid}: {exc}"
        except Exception as exc:
            log.exception("newsletter %s: cannot build the parts its messages share", nid)
            parts.broken = _reason(f"newsletter {nid}: its shared parts cannot be built", exc)
        if parts.broken is not None:
            log.error("newsletter %s: every message of it fails here: %s", nid, parts.broken)
        return parts

    def _now_header(self) -> str:
        now = int(time.time())
        if self._date[1] != now:
            self._date = (email.utils.formatdate(now, usegmt=True), now)
        return self._date[0]

    def _build(self, row: Mapping[str, Any]) -> Envelope | None:
        """The message's Envelope; None when it was skipped or failed here (recorded)."""
        mid = int(row["id"])
        reason = None
        if row["status"] != "active":
            reason = f"subscriber {row['status']}"
        elif int(row["blocked"]):
            reason = "address or domain blocked"
        parts = self._parts(int(row["newsletter_id"]))
        if parts is None:
            reason = "newsletter vanished"
        assert self.writer is not None
        if reason or parts is None or row["body"] is None:
            self.writer.add("skipped", (mid, reason or "no merged body"))
            return None
        try:
            if parts.broken is not None:
                raise BuildError(parts.broken)
            return self._envelope(row, parts)
        except BuildError as exc:
            failure = f"cannot build message: {exc}"
            log.warning("message %s failed: %s", mid, failure)
        except Exception as exc:
            log.exception("message %s: unexpected error building it; failed", mid)
            failure = _reason("cannot build message: unexpected error", exc)
        failure = failure[:MAX_REPLY]
        self.writer.add("failed", (mid, 0, failure, None), (mid, "failed", failure))
        self.processed += 1
        return None

    def _envelope(self, row: Mapping[str, Any], parts: NewsletterParts) -> Envelope:
        """Final bytes for one message; BuildError says which step refused it and why."""
        mid = int(row["id"])
        s = self.config.sending
        token = unsubscribe_token(self.secret, int(row["subscriber_id"]), parts.list_id)
        url = self.config.unsubscribe.url.format(token=token)
        headers = [
            ("Message-ID", message_id_header(self.secret, mid, parts.newsletter_id,
                                             s.envelope_domain)),
            ("Date", self._now_header()),
            ("List-Unsubscribe", f"<{url}>, <mailto:{self.config.unsubscribe.mailto}"
                                 f"?subject=unsubscribe%20{token}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ("List-Id", f"{safe_header_value(parts.list_name)} "
                        f"<list{parts.list_id}.{s.envelope_domain}>"),
            ("Precedence", "bulk"),
        ]
        try:
            stored = decompress(row["body"], parts.zdict)
        except zlib.error as exc:
            raise BuildError(f"stored body is corrupt (zlib: {exc})") from None
        try:
            data = finalize(stored, parts.tail, headers)
        except ValueError as exc:
            raise BuildError(f"refused by finalize: {exc}") from None
        if self.signer is not None:
            try:
                data = self.signer.sign(data)
            except (ValueError, RuntimeError, OSError) as exc:
                raise BuildError(f"DKIM signing failed: {exc}") from None
        return Envelope(key=mid, sender=verp_address(self.secret, mid, s.envelope_domain),
                        recipient=row["email"], data=data)


def _reason(what: str, exc: BaseException, suffix: str = "") -> str:
    """One line for the reply column: what failed and the exception, at most MAX_REPLY."""
    text = " ".join(f"{what}: {type(exc).__name__}: {exc} {suffix}".split())
    return text[:MAX_REPLY]


def _status(reply: str) -> str | None:
    for word in reply.split()[:3]:
        if word.count(".") == 2 and word.replace(".", "").isdigit():
            return word
    return None
