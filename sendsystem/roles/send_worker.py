"""`sendsystem send-worker`: the SendingSystem.

Takes its own batches of merged (and due deferred) messages and delivers
them over SMTP with the :class:`DeliveryPool`, ``connections`` per relay.
Each message's final bytes are the stored merge + the newsletter's
attachment parts (built once per newsletter) + the per-send headers
(Message-ID, Date, List-Unsubscribe, List-Unsubscribe-Post, List-Id,
Precedence), DKIM-signed when ``[dkim] key_file`` is set; the envelope
sender is a signed VERP address.

Nothing lost, duplicates bounded: every final outcome (a 250, a 5xx) is
appended to the local journal the moment it arrives, then written to the
database in small transactions at least once a second, after which the
journal is emptied. On start-up the journal is replayed into the database
before any new work, so a worker restarted after SIGKILL does not resend
what the relay already accepted. Only messages on the wire at the instant
of the kill (at most ``connections`` x relays) can go out twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..addresses import domain_of
from ..delivery import DeliveryPool, Envelope, Outcome, Result
from ..journal import Journal
from ..merge import TemplateSource, compression_dictionary, decompress
from ..mime import Attachment, attachment_tail, finalize, safe_header_value
from ..ratelimit import AsyncRateLimiter, DomainRateLimiter
from ..ratemeter import RateMeter
from ..recipients import RECIPIENT_STATEMENTS, record_bounce
from ..runner import Runner
from ..signing import unsubscribe_token, verp_address

log = logging.getLogger(__name__)

CHUNK = 500
FLUSH_SECONDS = 0.5
FLUSH_COUNT = 200


@dataclass
class NewsletterParts:
    """What every message of one newsletter shares, built once per worker."""

    newsletter_id: int
    list_id: int
    list_name: str
    zdict: bytes
    tail: bytes


@dataclass
class Pending:
    """Outcomes not yet in the database."""

    # Row tuples in the order of the statements' `-- values:` columns.
    sent: list[tuple[Any, ...]] = field(default_factory=list)
    failed: list[tuple[Any, ...]] = field(default_factory=list)
    deferred: list[tuple[Any, ...]] = field(default_factory=list)
    skipped: list[tuple[Any, ...]] = field(default_factory=list)
    bounces: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sent) + len(self.failed) + len(self.deferred) + len(self.skipped)


def retry_delay(attempts: int, retry_min: float, retry_max: float) -> float:
    """Exponential back-off with +-20 % jitter, so retries of one batch spread out."""
    base = min(retry_max, retry_min * (2 ** min(attempts, 30)))
    return base * random.uniform(0.8, 1.2)


def message_id_header(message_id: int, newsletter_id: int, domain: str) -> str:
    """Deterministic, so a retry keeps its Message-ID and a bounce can be matched."""
    return f"<{message_id}.{newsletter_id}.ss@{domain}>"


class SendWorker(Runner):
    role = "send"
    statements = ("my_batches", "my_backlog", "batch_mark_done", "newsletter_get",
                  "attachments_for_newsletter", "send_batch_messages", "send_mark_sent",
                  "send_mark_failed", "send_mark_deferred", "send_mark_skipped",
                  "my_batches_hand_back_messages", "my_batches_mark_reclaimed",
                  "pending_for_role", *RECIPIENT_STATEMENTS)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        s = self.config.sending
        self.secret = self.config.secret()
        self.meter = RateMeter()
        self.parts: dict[int, NewsletterParts | None] = {}
        self.pending = Pending()
        # Rows handed to the pool whose outcome is not yet in the database.
        self.unflushed: dict[int, dict[str, Any]] = {}
        self.journal = Journal(self.config.paths.journal_dir, f"send-{self.options.name}")
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

    # -- lifecycle ----------------------------------------------------------------

    def setup(self) -> None:
        replayed = self.journal.replay()
        if replayed:
            final = {mid: (outcome, reply) for mid, outcome, reply in replayed}
            worker = {"worker": self.worker_id}
            with self.db.transaction():
                for outcome in ("sent", "failed"):
                    self.db.execute_values(
                        f"send_mark_{outcome}",
                        [(mid, _code(reply), reply[:500], None)
                         for mid, (o, reply) in final.items() if o == outcome], worker)
            log.warning("replayed %d journal entries of a previous run into the database "
                        "(not sent again)", len(final))
        self.journal.truncate()

    def shutdown(self) -> None:
        self._flush()
        with self.db.transaction():
            n = self.db.execute("my_batches_hand_back_messages", {"worker": self.worker_id})
            self.db.execute("my_batches_mark_reclaimed", {"worker": self.worker_id})
        if n:
            log.info("send worker %s handed back %d messages", self.options.name, n)
        if self.pool is not None:
            self.loop.run_until_complete(self.pool.close())
        self.loop.close()

    def heartbeat_fields(self) -> dict[str, object]:
        backlog = int(self.db.fetchval("my_backlog", {"worker": self.worker_id}) or 0)
        return {"rate": self.meter.rate(), "backlog": backlog}

    def drained(self) -> bool:
        return not self.db.fetchall("my_batches", {"worker": self.worker_id}) and \
            not self.db.fetchval("pending_for_role",
                                 {"states": ("queued", "merged", "deferred")})

    # -- the work ----------------------------------------------------------------

    def work(self) -> int:
        batches = self.db.fetchall("my_batches", {"worker": self.worker_id})
        if not batches:
            return 0
        return self.loop.run_until_complete(self._send_batches(batches))

    async def _send_batches(self, batches: list[dict[str, Any]]) -> int:
        s = self.config.sending
        if self.pool is None:
            self.pool = DeliveryPool(s.relays, connections=s.connections,
                                     messages_per_connection=s.messages_per_connection,
                                     timeout=s.timeout, helo=s.helo or None,
                                     relay_backoff_min=s.relay_backoff_min,
                                     relay_backoff_max=s.relay_backoff_max)
            self.rate_limit = AsyncRateLimiter(self.options.max_rate, burst=1)
            self.domain_limit = DomainRateLimiter(s.domain_rates)
        queue: asyncio.Queue[Envelope | None] = asyncio.Queue(maxsize=self.concurrency * 2)
        rows_by_id = self.unflushed
        senders = [asyncio.create_task(self._sender(queue, rows_by_id))
                   for _ in range(self.concurrency)]
        done = 0
        last_flush = time.monotonic()
        started = time.monotonic()
        try:
            for batch in batches:
                while not self.stopping:
                    rows = self.db.fetchall("send_batch_messages",
                                            {"batch": batch["id"], "limit": CHUNK})
                    rows = [r for r in rows if int(r["id"]) not in rows_by_id]
                    if not rows:
                        # Everything fetched is delivered or in flight; once the
                        # queue drains the batch is finished.
                        await queue.join()
                        self._flush()
                        if not self.db.fetchall("send_batch_messages",
                                                {"batch": batch["id"], "limit": 1}):
                            self.db.execute("batch_mark_done", {"batch": batch["id"]})
                            break
                        continue
                    for row in rows:
                        env = self._envelope(row)
                        if env is None:
                            continue
                        rows_by_id[env.key] = row
                        await queue.put(env)
                        done += 1
                        if time.monotonic() - last_flush >= FLUSH_SECONDS or \
                                len(self.pending) >= FLUSH_COUNT:
                            self._flush()
                            self.heartbeat()
                            last_flush = time.monotonic()
                        if self.stopping:
                            break
                if self.stopping:
                    break
            await queue.join()
        finally:
            for _ in senders:
                await queue.put(None)
            await asyncio.gather(*senders, return_exceptions=True)
            self._flush()
            self.meter.busy(done, time.monotonic() - started)
        return done

    async def _sender(self, queue: asyncio.Queue[Envelope | None],
                      rows: dict[int, dict[str, Any]]) -> None:
        assert self.pool is not None
        while True:
            env = await queue.get()
            try:
                if env is None:
                    return
                await self.rate_limit.acquire()
                await self.domain_limit.acquire(domain_of(env.recipient))
                result = await self.pool.deliver(env)
                # The row stays in `rows` until its outcome is in the database,
                # so the next fetch of the batch does not send it again.
                self._record(result, rows[env.key])
            except Exception:
                log.exception("unexpected error delivering message %s", getattr(env, "key", "?"))
                if env is not None:
                    rows.pop(env.key, None)
            finally:
                queue.task_done()

    def _record(self, result: Result, row: Mapping[str, Any]) -> None:
        mid = result.key
        msgid = message_id_header(mid, int(row["newsletter_id"]),
                                  self.config.sending.envelope_domain)
        reply = result.reply[:500]
        s = self.config.sending
        if result.outcome is Outcome.SENT:
            self.journal.append([(mid, "sent", reply)])
            self.pending.sent.append((mid, result.code, reply, msgid))
        elif result.outcome is Outcome.FAILED or int(row["age"] or 0) > s.max_age:
            if result.outcome is Outcome.DEFERRED:
                reply = f"gave up after {int(row['attempts']) + 1} attempts: {reply}"[:500]
            self.journal.append([(mid, "failed", reply)])
            self.pending.failed.append((mid, result.code, reply, msgid))
            if result.blames_recipient:
                self.pending.bounces.append({"email": row["email"], "message_id": mid,
                                             "subscriber_id": int(row["subscriber_id"]),
                                             "status": _status(result.reply),
                                             "diagnostic": result.reply})
        else:
            delay = retry_delay(int(row["attempts"]), s.retry_min, s.retry_max)
            self.pending.deferred.append((mid, result.code, reply, int(delay * 1_000_000)))
        self.processed += 1

    def _flush(self) -> None:
        """Write outcomes to the database, then empty the journal."""
        p = self.pending
        if not len(p) and not p.bounces:
            return
        worker = {"worker": self.worker_id}
        # If the database goes away mid-transaction the outcomes stay pending
        # (and the final ones in the journal) for the next flush.
        with self.db.transaction():
            self.db.execute_values("send_mark_sent", p.sent, worker)
            self.db.execute_values("send_mark_failed", p.failed, worker)
            self.db.execute_values("send_mark_deferred", p.deferred, worker)
            self.db.execute_values("send_mark_skipped", p.skipped, worker)
        self.pending = Pending()
        self.journal.truncate()
        for group in (p.sent, p.failed, p.deferred):
            for row in group:
                self.unflushed.pop(row[0], None)
        for b in p.bounces:
            record_bounce(self.db, self.config.bounce, kind="hard", **b)

    # -- building the message ------------------------------------------------------

    def _parts(self, newsletter_id: int) -> NewsletterParts | None:
        if newsletter_id not in self.parts:
            row = self.db.fetchone("newsletter_get", {"id": newsletter_id})
            if row is None:
                self.parts[newsletter_id] = None
            else:
                src = TemplateSource(subject=row["subject"], html=row["html"], text=row["text"])
                atts = [Attachment(a["filename"], a["content_type"], a["data"])
                        for a in self.db.fetchall("attachments_for_newsletter",
                                                  {"id": newsletter_id})]
                self.parts[newsletter_id] = NewsletterParts(
                    newsletter_id=newsletter_id, list_id=int(row["list_id"]),
                    list_name=row["list_name"], zdict=compression_dictionary(src),
                    tail=attachment_tail(newsletter_id, atts) if atts else b"",
                )
        return self.parts[newsletter_id]

    def _now_header(self) -> str:
        now = int(time.time())
        if self._date[1] != now:
            self._date = (email.utils.formatdate(now, usegmt=True), now)
        return self._date[0]

    def _envelope(self, row: Mapping[str, Any]) -> Envelope | None:
        mid = int(row["id"])
        reason = None
        if row["status"] != "active":
            reason = f"subscriber {row['status']}"
        elif int(row["blocked"]):
            reason = "address or domain blocked"
        parts = self._parts(int(row["newsletter_id"]))
        if parts is None:
            reason = "newsletter vanished"
        if reason or parts is None or row["body"] is None:
            self.pending.skipped.append((mid, reason or "no merged body"))
            return None
        s = self.config.sending
        token = unsubscribe_token(self.secret, int(row["subscriber_id"]), parts.list_id)
        url = self.config.unsubscribe.url.format(token=token)
        headers = [
            ("Message-ID", message_id_header(mid, parts.newsletter_id, s.envelope_domain)),
            ("Date", self._now_header()),
            ("List-Unsubscribe", f"<{url}>, <mailto:{self.config.unsubscribe.mailto}"
                                 f"?subject=unsubscribe%20{token}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ("List-Id", f"{safe_header_value(parts.list_name)} "
                        f"<list{parts.list_id}.{s.envelope_domain}>"),
            ("Precedence", "bulk"),
        ]
        data = finalize(decompress(row["body"], parts.zdict), parts.tail, headers)
        if self.signer is not None:
            data = self.signer.sign(data)
        return Envelope(key=mid, sender=verp_address(self.secret, mid, s.envelope_domain),
                        recipient=row["email"], data=data)


def _code(reply: str) -> int:
    head = reply[:3]
    return int(head) if head.isdigit() else 0


def _status(reply: str) -> str | None:
    for word in reply.split()[:3]:
        if word.count(".") == 2 and word.replace(".", "").isdigit():
            return word
    return None
