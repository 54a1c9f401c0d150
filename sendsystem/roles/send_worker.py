"""`sendsystem send-worker`: the SendingSystem.

Takes its own batches of merged (and due deferred) messages and delivers
them over SMTP with the :class:`DeliveryPool`, ``connections`` per relay.
Each message's final bytes are the stored merge + the newsletter's
attachment parts (built once per newsletter) + the per-send headers
(Message-ID, Date, List-Unsubscribe, List-Unsubscribe-Post, List-Id,
Precedence), DKIM-signed when ``[dkim] key_file`` is set; the envelope
sender is a signed VERP address and the Message-ID is signed too
(:func:`sendsystem.signing.message_id_header`), so a bounce or complaint
quoting either can be tied to this message and nobody else can forge one.

Nothing lost, duplicates bounded: every final outcome (a 250, a 5xx) is
appended to the local journal the moment it arrives and committed by the
group-commit writer (outcomes.py) as soon as its previous write is done.
On start-up the journal is replayed into the database before any new work,
so a worker restarted after SIGKILL does not resend what the relay already
accepted. Only messages on the wire at the instant of the kill (at most
``connections`` x relays) can go out twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..addresses import domain_of
from ..delivery import DeliveryPool, Envelope, Outcome, Result
from ..merge import TemplateSource, compression_dictionary, decompress
from ..mime import Attachment, attachment_tail, finalize, safe_header_value
from ..ratelimit import AsyncRateLimiter, DomainRateLimiter
from ..ratemeter import RateMeter
from ..runner import Runner
from ..signing import message_id_header, unsubscribe_token, verp_address
from .outcomes import OUTCOME_STATEMENTS, OutcomeWriter

log = logging.getLogger(__name__)

CHUNK = 500


@dataclass
class NewsletterParts:
    """What every message of one newsletter shares, built once per worker."""

    newsletter_id: int
    list_id: int
    list_name: str
    zdict: bytes
    tail: bytes


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

    # -- lifecycle ----------------------------------------------------------------

    def setup(self) -> None:
        self.writer = OutcomeWriter(self.config, self.worker_id, self.options.name,
                                    self._abort_db_wait)
        self.writer.replay()
        self.writer.start()

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
        writer = self.writer
        assert writer is not None
        senders = [asyncio.create_task(self._sender(queue, rows_by_id))
                   for _ in range(self.concurrency)]
        done = 0
        started = time.monotonic()
        try:
            for batch in batches:
                while not self.stopping:
                    for mid in writer.take_written():
                        rows_by_id.pop(mid, None)
                    rows = self.db.fetchall("send_batch_messages",
                                            {"batch": batch["id"], "limit": CHUNK})
                    rows = [r for r in rows if int(r["id"]) not in rows_by_id]
                    if not rows:
                        # Everything fetched is delivered or in flight; once the
                        # queue drains and outcomes are written, the batch is done.
                        await queue.join()
                        writer.drain()
                        for mid in writer.take_written():
                            rows_by_id.pop(mid, None)
                        if not self.db.fetchall("send_batch_messages",
                                                {"batch": batch["id"], "limit": 1}):
                            self.db.execute("batch_mark_done", {"batch": batch["id"]})
                            break
                        continue
                    for row in rows:
                        rows_by_id[int(row["id"])] = row
                        env = self._envelope(row)
                        if env is not None:
                            await queue.put(env)
                            done += 1
                        self.heartbeat()
                        if self.stopping:
                            break
                if self.stopping:
                    break
            await queue.join()
        finally:
            for _ in senders:
                await queue.put(None)
            await asyncio.gather(*senders, return_exceptions=True)
            writer.drain()
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
            assert self.writer is not None
            self.writer.add("skipped", (mid, reason or "no merged body"))
            return None
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
        data = finalize(decompress(row["body"], parts.zdict), parts.tail, headers)
        if self.signer is not None:
            data = self.signer.sign(data)
        return Envelope(key=mid, sender=verp_address(self.secret, mid, s.envelope_domain),
                        recipient=row["email"], data=data)


def _status(reply: str) -> str | None:
    for word in reply.split()[:3]:
        if word.count(".") == 2 and word.replace(".", "").isdigit():
            return word
    return None
