"""`sendsystem send-worker`: the SendingSystem.

Takes its own batches of merged (and due deferred) messages and delivers
them over SMTP with the :class:`DeliveryPool`, ``connections`` per relay.
Each message's final bytes (per-send headers, attachments, DKIM, the signed
VERP sender) are built by :mod:`sendsystem.compose`; this module fetches,
gates, delivers and records.

The batch loop (:meth:`SendWorker._send_batches`), one round per ``work()``:
for each batch, fetch a chunk of rows not already in hand, build their
shared parts once per newsletter, build each envelope and queue it; the
sender tasks (one per relay connection: the sum of each relay's
``connections``) take envelopes off the queue, wait for the rate limits,
pass the fence gate and deliver; after the relay's 354 (right before the
body) they take a slot of the unconfirmed window and check the fence again,
then hand the outcome to the writer. A batch is done when a fetch
finds nothing left once every outcome of it is written.

Nothing lost, duplicates bounded: every final outcome (a 250, a 5xx) is
appended to the local journal the moment it arrives and committed by the
group-commit writer (outcomes.py) as soon as its previous write is done.
On start-up the journal is replayed into the database before any new work,
so a worker restarted after SIGKILL does not resend what the relay already
accepted. Only messages on the wire at the instant of the kill (at most the
unconfirmed window, below) can go out twice.

Poison messages (Mailman's shunt, here "failed with the reason"): a message
that cannot be built -- a stored body that does not decompress, one that
:func:`~sendsystem.mime.finalize` refuses, a DKIM signing error, a newsletter whose
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
  keeps deciding while a query hangs on a partition. The check that counts
  is made at the point of no return: after the relay's 354 reply to DATA,
  right before the body (:meth:`_Hold.ready`, called by the pool with no
  await between it and the write): no completed heartbeat for
  ``heartbeat_timeout / 2`` (monotonic clock), or the batch no longer ours,
  and the body is not sent: the connection is closed in the middle of DATA
  (after 354 an RSET would be message text; a relay discards a transaction
  whose final dot never came), the message is *withdrawn* and goes back to
  the gate, which waits while fenced and drops it when its batch is gone.
  The balancer reclaims only after ``heartbeat_timeout``.
* The unconfirmed window: a 250 the database does not know yet is a
  duplicate if the batch is reclaimed (a peer cannot read this server's
  journal). So messages on the wire that could be accepted (their body
  sent) plus 250s not yet committed are at most ``[sending]
  unconfirmed_window`` (default: the sender tasks, i.e. the sum of the
  relays' ``connections``, which is ``connections`` x relays when they
  share the [sending] value): a sender takes its slot after the 354 and it
  is freed when the outcome writer has committed the 250 (at once for any
  other outcome). Cut off from the database, a worker therefore stops
  after at most that many, and those are its only possible duplicates.
  MAIL, RCPT and DATA are outside the window (nothing can be accepted
  before the body), so a connection prepares its next message while the
  previous one's 250 is being committed; a sender waiting at 354 for a
  slot is woken (and withdraws) within 50 ms when the fence shuts.
  The price of the window: each slot waits for a commit, and the outcome
  writer waits (at most 2 ms) for every body on the wire to be answered
  before it writes, so one write frees the whole window (outcomes.py).
  One send worker on one core, 8 connections, smtp-sink, 22 KB messages
  (bench/pipeline.py --send-only --cpu 0, a box shared with other
  benchmarks, load 2.8-4.3): slot taken before MAIL, 1,002 / 1,008 / 737
  msgs/s and 493 / 513 / 553 us CPU/message; after the 354 with the
  gathering writer, 1,087 / 837 / 962 msgs/s and 456 / 507 / 471 us
  (50,000 each, interleaved). A slot is then held ~5 ms: ~1 ms for the
  body's 250, ~1 ms gathering, ~2-4 ms for the write, whose thread used
  0.2 ms of CPU (the rest is the database and waiting for the event loop's
  core); so a window of 8 allows ~1,600 msgs/s whatever the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ..addresses import domain_of
from ..compose import BuildError, Composer, NewsletterParts, dkim_signer
from ..config import Config, Relay
from ..delivery import (
    MAX_REPLY,
    DeliveryPool,
    Envelope,
    Outcome,
    Result,
    Withdrawn,
    reason_line,
)
from ..errors import SendSystemError, TemporaryError
from ..fencing import Fence
from ..journal import JournalError
from ..ratelimit import AsyncRateLimiter, DomainRateLimiter
from ..relaylimits import RELAY_STATEMENTS, Claim, ClusterLimits, claim
from ..runner import RunOptions
from ..smtpstatus import enhanced_status
from ..states import SEND_PENDING, MessageState, skip_reason
from .batch_worker import BATCH_STATEMENTS, LIMIT_BURST, BatchWorker
from .outcomes import OUTCOME_STATEMENTS, OutcomeWriter

log = logging.getLogger(__name__)

CHUNK = 500
T = TypeVar("T")


def retry_delay(attempts: int, retry_min: float, retry_max: float) -> float:
    """Exponential back-off with +-20 % jitter, so retries of one batch spread out."""
    base = min(retry_max, retry_min * float(2 ** min(attempts, 30)))
    return base * random.uniform(0.8, 1.2)


@dataclass
class _Round:
    """One run of the batch loop (one ``work()``): its queue and its counts."""

    queue: asyncio.Queue[Envelope | None]
    discarded_before: int  # SendWorker.discarded when the round started
    started: float = field(default_factory=time.monotonic)
    queued: int = 0


class Window:
    """The unconfirmed window's slots (module docstring): a semaphore whose waiters
    can be sent away. :meth:`take` waits for a slot; :meth:`interrupt` wakes every
    waiter with False (no slot), so a sender holding a relay connection after its
    354 can re-check the fence instead of waiting for a commit that may not come.
    A released slot goes straight to the oldest waiter."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[bool]] = deque()

    async def take(self) -> bool:
        """True: a slot is now ours; False: interrupted, no slot taken."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                if fut.result():
                    self.release()  # handed to us as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                return
        self.free += 1

    def interrupt(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_result(False)


class _Hold:
    """One sender's message at the point of no return: :meth:`ready` is the pool's
    callback after the relay's 354 (take a window slot, then the fence check)."""

    __slots__ = ("env", "held", "wire", "worker")

    def __init__(self, worker: SendWorker) -> None:
        self.worker = worker
        self.env: Envelope | None = None
        self.held = False  # this message holds a window slot
        self.wire = False  # its body went out and its outcome is not yet queued

    async def ready(self) -> bool:
        """May the body go now? No await may follow a True before it is written."""
        w, env = self.worker, self.env
        assert w._window is not None and env is not None
        while w._may_send(env):
            if await w._window.take():
                if w._may_send(env):
                    self.held = self.wire = True
                    w.on_wire += 1
                    return True
                w._window.release()
                return False
            # Interrupted (the fence shut, a batch was lost, a failure): look again.
        return False


class SendWorker(BatchWorker):
    role = "send"
    pending_states = SEND_PENDING
    statements = (*BATCH_STATEMENTS, "attachments_for_newsletter", "send_batch_messages",
                  *RELAY_STATEMENTS, *OUTCOME_STATEMENTS)

    def __init__(self, config: Config, options: RunOptions) -> None:
        super().__init__(config, options)
        s = config.sending
        self.composer = Composer(config, self.secret, dkim_signer(config))
        # Rows handed to the pool whose outcome is not yet in the database:
        # the next fetch of their batch must not send them again.
        self.unflushed: dict[int, dict[str, Any]] = {}
        self.writer: OutcomeWriter | None = None
        self.loop = asyncio.new_event_loop()
        self.pool: DeliveryPool | None = None
        self.concurrency = sum(r.connections or s.connections for r in s.relays)
        self.rate_limit = AsyncRateLimiter(options.max_rate, burst=LIMIT_BURST)
        self.domain_limit = DomainRateLimiter(s.domain_rates)
        # Fencing (module docstring).
        self.fence = Fence(config.balancer.heartbeat_timeout)
        self.owned: set[int] = set()        # batch ids last verified as ours
        self.batch_of: dict[int, int] = {}  # message id -> batch, for rows in `unflushed`
        self.fenced_since: float | None = None
        self.discarded = 0                  # queued messages dropped for reclaimed batches
        self.withdrawn = 0                  # transactions abandoned after the relay's 354
        # Bodies sent whose outcome is not yet queued for the writer, which waits
        # for them (briefly) before a commit: read by the writer thread.
        self.on_wire = 0
        self._window: Window | None = None
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
                                    on_written=self._on_written,
                                    in_flight=lambda: self.on_wire)
        self.writer.replay()
        self.writer.start()

    def _journal_failed(self, exc: JournalError) -> None:
        # May run in the writer thread: it only sets flags the event loop reads.
        self.fail(exc, "the send journal cannot be written")

    def before_hand_back(self) -> None:
        # Every outcome in memory reaches the database before its batch goes back.
        if self.writer is not None:
            self.writer.drain()

    def after_hand_back(self) -> None:
        if self.pool is not None:
            self.loop.run_until_complete(self.pool.close())
        self.loop.close()
        if self.writer is not None:
            self.writer.close()

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
            if self._window is not None:
                # Runs in a thread: the senders waiting after a 354 re-check.
                with contextlib.suppress(RuntimeError):  # the loop is closed: on the way out
                    self.loop.call_soon_threadsafe(self._window.interrupt)
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
            if self._window is not None and (
                    self.failure is not None or not self.fence.is_open(self.db.reconnects)):
                # Senders waiting after a 354 re-check (and withdraw) rather than
                # hold the relay until a commit that may not come.
                self._window.interrupt()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    async def _gate(self, env: Envelope) -> bool:
        """Wait until ``env`` may start a transaction; False: drop it (its batch is not
        ours, or we are stopping while fenced). The check that counts is
        :meth:`_may_send`, again after the relay's 354 (:meth:`_Hold.ready`)."""
        while True:
            if self.batch_of.get(env.key) not in self.owned:
                return False
            if self.fence.is_open(self.db.reconnects):
                return True
            if self.stopping:
                return False
            await asyncio.sleep(0.02)

    def _may_send(self, env: Envelope) -> bool:
        """May the body of ``env`` go to the relay now (the point of no return)?"""
        return (self.failure is None and self.batch_of.get(env.key) in self.owned
                and self.fence.is_open(self.db.reconnects))

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
        batches = self.my_batches()
        if not batches:
            return 0
        self.owned = {int(b["id"]) for b in batches}
        return self.loop.run_until_complete(self._send_batches(batches))

    def make_pool(self) -> DeliveryPool:
        """The SMTP pool (inside the running loop); tests subclass it to inject faults."""
        s = self.config.sending
        limits = ClusterLimits(self._claim) if any(r.limited for r in s.relays) else None
        return DeliveryPool(s.relays, connections=s.connections,
                            messages_per_connection=s.messages_per_connection,
                            timeout=s.timeout, helo=s.helo or None,
                            relay_backoff_min=s.relay_backoff_min,
                            relay_backoff_max=s.relay_backoff_max, limits=limits)

    async def _claim(self, relay: Relay, n: int, now: datetime | None, factor: float) -> Claim:
        """Cluster-wide relay tokens (sendsystem/relaylimits.py), off the event loop."""
        return await self._db(claim, self.db, relay, n, now, factor)

    def heartbeat_fields(self) -> dict[str, object]:
        if self.pool is not None:
            # What this worker's pool sees of each relay, for `sendsystem relays`.
            for r in self.pool.relay_status():
                self.db.execute("relay_health_put", {
                    "relay": r["relay"], "worker": self.worker_id, "group": r["group"],
                    "health": r["health"], "last_error": str(r["last_error"])[:500],
                    "rate": r["rate"], "slow_rate": r["slow_rate"], "sent": r["sent"],
                    "deferred": r["deferred"], "failed": r["failed"]})
        return super().heartbeat_fields()

    async def _send_batches(self, batches: list[dict[str, Any]]) -> int:
        """Deliver what ``batches`` hold; how many messages went to the relay."""
        if self.pool is None:
            self.pool = self.make_pool()
            self._window = Window(self.window)
        round_ = _Round(asyncio.Queue(maxsize=self.concurrency * 2), self.discarded)
        senders = [asyncio.create_task(self._sender(round_.queue))
                   for _ in range(self.concurrency)]
        self._db_lock = asyncio.Lock()
        finished = asyncio.Event()
        watchers = [asyncio.create_task(self._keep_alive(finished)),
                    asyncio.create_task(self._watch_fence(finished))]
        try:
            for batch in batches:
                await self._send_batch(int(batch["id"]), round_)
                if self.stopping:
                    break
            await round_.queue.join()
        finally:
            await self._end_round(round_, senders, watchers, finished)
        return round_.queued - (self.discarded - round_.discarded_before)

    async def _send_batch(self, batch: int, round_: _Round) -> None:
        """Queue the rows of one batch, chunk by chunk, while it is ours; mark it done
        once everything of it is delivered and written."""
        while not self.stopping and batch in self.owned:
            rows = await self._next_chunk(batch)
            if not rows:
                if await self._batch_finished(batch, round_.queue):
                    return
                continue
            await self._load_parts(rows)
            await self._enqueue(batch, rows, round_)

    async def _next_chunk(self, batch: int) -> list[dict[str, Any]]:
        """The batch's next rows that are not already in hand (queued or unwritten)."""
        self._forget_written()
        rows = await self._db(self.db.fetchall, "send_batch_messages",
                              {"batch": batch, "limit": CHUNK})
        return [r for r in rows if int(r["id"]) not in self.unflushed]

    async def _batch_finished(self, batch: int, queue: asyncio.Queue[Envelope | None]) -> bool:
        """Everything fetched is delivered or in flight: once the queue drains and the
        outcomes are written, the batch is done if no row is left in it."""
        assert self.writer is not None
        await queue.join()
        await asyncio.to_thread(self.writer.drain)
        self._forget_written()
        if await self._db(self.db.fetchall, "send_batch_messages", {"batch": batch, "limit": 1}):
            return False
        await self._db(self.mark_done, batch)
        return True

    async def _load_parts(self, rows: list[dict[str, Any]]) -> None:
        """Build the shared parts of each newsletter seen for the first time."""
        for nid in {int(r["newsletter_id"]) for r in rows} - self.composer.parts.keys():
            await self._db(self._parts, nid)

    async def _enqueue(self, batch: int, rows: list[dict[str, Any]], round_: _Round) -> None:
        """Build each row's envelope and queue it (waits while the queue is full); a row
        skipped or failed here has its outcome recorded instead."""
        for row in rows:
            if self.stopping or batch not in self.owned:
                return
            mid = int(row["id"])
            self.unflushed[mid] = row
            self.batch_of[mid] = batch
            try:
                env = self._build(row)
            except BaseException:
                # Database trouble: no outcome was recorded, so the row
                # must be fetched again when the work is retried.
                self._forget(mid)
                raise
            if env is not None:
                await round_.queue.put(env)
                round_.queued += 1

    async def _end_round(self, round_: _Round, senders: list[asyncio.Task[None]],
                         watchers: list[asyncio.Task[None]], finished: asyncio.Event) -> None:
        """Stop the senders (after what is queued), then the heartbeat and fence watchers;
        wait for the writer; count the round."""
        assert self.writer is not None
        for _ in senders:
            await round_.queue.put(None)
        await asyncio.gather(*senders, return_exceptions=True)
        finished.set()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.to_thread(self.writer.drain)
        discarded = self.discarded - round_.discarded_before
        if discarded:
            log.warning("send worker %s: discarded %d queued messages of reclaimed "
                        "batches (not sent)", self.options.name, discarded)
        self.meter.busy(round_.queued - discarded, time.monotonic() - round_.started)

    def _forget(self, mid: int) -> None:
        """A row in hand is no longer: its outcome is written, or it was not sent."""
        self.unflushed.pop(mid, None)
        self.batch_of.pop(mid, None)

    def _forget_written(self) -> None:
        assert self.writer is not None
        for mid in self.writer.take_written():
            self._forget(mid)

    async def _sender(self, queue: asyncio.Queue[Envelope | None]) -> None:
        """One of ``concurrency`` tasks: limits, fence gate, deliver (whose
        :meth:`_Hold.ready` takes the window slot and checks the fence again after the
        relay's 354, right before the body), record."""
        assert self.pool is not None and self._window is not None
        rows = self.unflushed
        hold = _Hold(self)
        while True:
            env = await queue.get()
            hold.env, hold.held = env, False
            try:
                if env is None:
                    return
                if self.failure is None:
                    await self.rate_limit.acquire()
                    await self.domain_limit.acquire(domain_of(env.recipient))
                result = await self._deliver(env, hold)
                if result is None:
                    continue
                if result.outcome is Outcome.SENT:
                    # The slot stays taken until the writer has committed the 250.
                    self._awaiting_commit.add(env.key)
                    hold.held = False
                # The row stays in `rows` until its outcome is in the database,
                # so the next fetch of the batch does not send it again.
                self._record(result, rows[env.key], env.message_id)
            except Exception as exc:
                # Recording failed (a bug): defer the row plainly rather than leave it
                # without an outcome, which would make its batch never finish.
                log.exception("message %s: cannot record its outcome; deferred",
                              getattr(env, "key", "?"))
                if env is not None:
                    if env.key in self._awaiting_commit:  # its 250 never reached the writer
                        self._awaiting_commit.discard(env.key)
                        hold.held = True
                    try:
                        self._defer_plainly(env.key, reason_line("cannot record outcome", exc))
                    except Exception as again:
                        # The row stays in `rows`, so it is not fetched and sent again;
                        # stop, and it goes back with the batch.
                        log.exception("message %s: cannot defer it either", env.key)
                        self.fail(SendSystemError(
                            f"Cannot record the outcome of message {env.key} ({again}); "
                            "this is a bug: report it with this log."),
                            "an outcome cannot be recorded")
            finally:
                if hold.held:
                    hold.held = False
                    self._window.release()
                queue.task_done()

    async def _deliver(self, env: Envelope, hold: _Hold) -> Result | None:
        """Gate and deliver ``env``; None: not handed to the relay (forgotten)."""
        assert self.pool is not None
        while True:
            if self.failure is not None:
                # Stopping because it is unsafe to go on: not handed to the relay;
                # the row stays merged/deferred and goes back with the batch.
                self._forget(env.key)
                return None
            if not await self._gate(env):
                # Reclaimed (its row belongs to another worker now) or
                # stopping while fenced (handed back at shutdown).
                self._forget(env.key)
                self.discarded += 1
                return None
            try:
                return await self.pool.deliver(env, hold.ready)
            except Withdrawn:
                # The fence shut (or the batch went, or a failure) while the relay
                # waited for the body: nothing was sent; back to the gate.
                self.withdrawn += 1
                log.info("message %s: withdrawn after the relay's 354 (%s); not sent",
                         env.key, self.fence.reason(self.db.reconnects)
                         if self.batch_of.get(env.key) in self.owned else "batch reclaimed")
            except Exception as exc:
                # deliver() returns SMTP and network trouble as a Result: this is a
                # bug. Deferred, not dropped (see the module docstring).
                log.exception("message %s: unexpected error in delivery; deferred", env.key)
                return Result(env.key, Outcome.DEFERRED, 0,
                              reason_line("unexpected error in delivery", exc,
                                          "(delivery status unknown)"), "", False)
            finally:
                if hold.wire:  # before its outcome is queued: the writer counts on it
                    hold.wire = False
                    self.on_wire -= 1

    # -- recording outcomes ---------------------------------------------------------

    def _defer_plainly(self, mid: int, reason: str) -> None:
        assert self.writer is not None
        delay = retry_delay(0, self.config.sending.retry_min, self.config.sending.retry_max)
        self.writer.add(MessageState.DEFERRED, (mid, 0, reason, int(delay * 1_000_000)))

    def _record(self, result: Result, row: Mapping[str, Any], msgid: str = "") -> None:
        """Queue the outcome of a delivery; ``msgid``: its envelope's Message-ID (the
        HMAC is not computed twice), "" to compute it."""
        assert self.writer is not None
        mid = result.key
        msgid = msgid or self.composer.message_id(mid, int(row["newsletter_id"]))
        reply = result.reply[:500]
        s = self.config.sending
        if result.outcome is Outcome.SENT:
            self.writer.add(MessageState.SENT, (mid, result.code, reply, msgid),
                            (mid, MessageState.SENT, reply))
        elif result.outcome is Outcome.FAILED or int(row["age"] or 0) > s.max_age:
            if result.outcome is Outcome.DEFERRED:
                reply = f"gave up after {int(row['attempts']) + 1} attempts: {reply}"[:500]
            bounce = None
            if result.blames_recipient:
                bounce = {"email": row["email"], "message_id": mid,
                          "subscriber_id": int(row["subscriber_id"]),
                          "status": enhanced_status(result.reply), "diagnostic": result.reply}
            self.writer.add(MessageState.FAILED, (mid, result.code, reply, msgid),
                            (mid, MessageState.FAILED, reply), bounce)
        else:
            delay = retry_delay(int(row["attempts"]), s.retry_min, s.retry_max)
            self.writer.add(MessageState.DEFERRED,
                            (mid, result.code, reply, int(delay * 1_000_000)))
        self.processed += 1

    # -- building the message ------------------------------------------------------

    def _parts(self, newsletter_id: int) -> NewsletterParts | None:
        """A newsletter's shared parts, read and built on first use (None: it is gone).

        Database errors propagate (the runner retries the unit of work); only
        building from what was read is this newsletter's own problem."""
        if newsletter_id not in self.composer.parts:
            row = self.db.fetchone("newsletter_get", {"id": newsletter_id})
            atts = [] if row is None else \
                self.db.fetchall("attachments_for_newsletter", {"id": newsletter_id})
            self.composer.remember(newsletter_id, row, atts)
        return self.composer.parts[newsletter_id]

    def _build(self, row: Mapping[str, Any]) -> Envelope | None:
        """The message's Envelope; None when it was skipped or failed here (recorded)."""
        assert self.writer is not None
        mid = int(row["id"])
        # Asked again at send time: the subscriber may have left since the merge.
        reason = skip_reason(row["status"], int(row["blocked"]))
        parts = self._parts(int(row["newsletter_id"]))
        if parts is None:
            reason = "newsletter vanished"
        if reason or parts is None or row["body"] is None:
            self.writer.add(MessageState.SKIPPED, (mid, reason or "no merged body"))
            return None
        try:
            return self.composer.envelope(row, parts)
        except BuildError as exc:
            failure = f"cannot build message: {exc}"
            log.warning("message %s failed: %s", mid, failure)
        except Exception as exc:
            log.exception("message %s: unexpected error building it; failed", mid)
            failure = reason_line("cannot build message: unexpected error", exc)
        failure = failure[:MAX_REPLY]
        self.writer.add(MessageState.FAILED, (mid, 0, failure, None),
                        (mid, MessageState.FAILED, failure))
        self.processed += 1
        return None
