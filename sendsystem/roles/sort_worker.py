"""`sendsystem sort-worker`: the SortingSystem.

Takes its own batches, merges each queued message with the subscriber's
data and stores the compressed result as `merged`. Recipients who are
unsubscribed, bounced, complained or blocked become `skipped`; a render
error fails that one message with its reason, never the batch. Results are
written per chunk in one transaction, and only for rows still ours.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..addresses import FromAddress
from ..merge import MergeError, Merger, NewsletterInfo, TemplateSource
from ..ratelimit import RateLimiter
from ..ratemeter import RateMeter
from ..runner import Runner
from ..tokens import unsubscribe_token

log = logging.getLogger(__name__)

CHUNK = 200


@dataclass(frozen=True)
class MergeResult:
    message_id: int
    state: str  # merged | skipped | failed
    body: bytes | None = None
    detail: str | None = None


def skip_reason(status: str, blocked: int) -> str | None:
    """Why a recipient must not be mailed, or None when they may be."""
    if status != "active":
        return f"subscriber {status}"
    if blocked:
        return "address or domain blocked"
    return None


def newsletter_merger(row: Mapping[str, Any]) -> Merger:
    """The Merger for a newsletter row (from `newsletter_get`)."""
    src = TemplateSource(subject=row["subject"], html=row["html"], text=row["text"])
    info = NewsletterInfo(
        newsletter_id=int(row["id"]), list_name=row["list_name"],
        from_header=FromAddress(row["from_name"], row["from_address"]).header(),
        has_attachments=bool(row["attachment_count"]),
    )
    return Merger(src, info)


class SortWorker(Runner):
    role = "sort"
    statements = ("my_batches", "my_backlog", "batch_mark_done", "newsletter_get",
                  "sort_batch_messages", "sort_mark", "my_batches_hand_back_messages",
                  "my_batches_mark_reclaimed", "pending_for_role")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.meter = RateMeter()
        # burst=1: a capped worker must look like a slower server from its
        # very first (probe) batch, or the balancer would over-trust it.
        self.limiter = RateLimiter(self.options.max_rate, burst=1)
        # Report progress (rate, results) about once a second even when capped.
        rate = self.options.max_rate
        self.chunk = CHUNK if rate is None else max(10, min(CHUNK, int(rate)))
        self.mergers: dict[int, Merger | None] = {}
        self.secret = self.config.secret()
        self.url_template = self.config.unsubscribe.url

    def heartbeat_fields(self) -> dict[str, object]:
        backlog = int(self.db.fetchval("my_backlog", {"worker": self.worker_id}) or 0)
        return {"rate": self.meter.rate(), "backlog": backlog}

    def drained(self) -> bool:
        return not self.db.fetchall("my_batches", {"worker": self.worker_id}) and \
            not self.db.fetchval("pending_for_role", {"states": ("queued",)})

    def merger_for(self, newsletter_id: int) -> Merger | None:
        if newsletter_id not in self.mergers:
            row = self.db.fetchone("newsletter_get", {"id": newsletter_id})
            self.mergers[newsletter_id] = newsletter_merger(row) if row else None
        return self.mergers[newsletter_id]

    def work(self) -> int:
        done = 0
        for batch in self.db.fetchall("my_batches", {"worker": self.worker_id}):
            while not self.stopping:
                rows = self.db.fetchall("sort_batch_messages",
                                        {"batch": batch["id"], "limit": self.chunk})
                if not rows:
                    self.db.execute("batch_mark_done", {"batch": batch["id"]})
                    break
                done += self.process(int(batch["id"]), int(batch["newsletter_id"]), rows)
            if self.stopping:
                break
        return done

    def process(self, batch: int, newsletter_id: int, rows: list[dict[str, Any]]) -> int:
        started = time.monotonic()
        merger = self.merger_for(newsletter_id)
        results = []
        for row in rows:
            self.limiter.acquire()
            results.append(self.merge_one(merger, row))
            self.heartbeat()
        self.db.execute_values("sort_mark",
                               [(r.message_id, r.state, r.body, r.detail) for r in results],
                               {"batch": batch, "worker": self.worker_id})
        self.meter.busy(len(rows), time.monotonic() - started)
        self.processed += len(rows)
        return len(rows)

    def merge_one(self, merger: Merger | None, row: Mapping[str, Any]) -> MergeResult:
        mid = int(row["id"])
        reason = skip_reason(row["status"], int(row["blocked"]))
        if reason:
            return MergeResult(mid, "skipped", detail=reason)
        if merger is None:
            return MergeResult(mid, "failed", detail="newsletter vanished")
        token = unsubscribe_token(self.secret, int(row["subscriber_id"]), int(row["list_id"]))
        try:
            fields = json.loads(row["fields"])
            message = merger.render(row["email"], fields, self.url_template.format(token=token))
        except MergeError as exc:
            return MergeResult(mid, "failed", detail=str(exc)[:500])
        except Exception as exc:
            # One row's data (fields that are not JSON, or that make render raise
            # something else) fails that message alone, never the chunk or the worker.
            log.warning("message %s: cannot merge: %s: %s", mid, type(exc).__name__, exc)
            what = "subscriber fields are not valid JSON" if isinstance(
                exc, json.JSONDecodeError) else "cannot merge"
            return MergeResult(mid, "failed", detail=f"{what}: {type(exc).__name__}: {exc}"[:500])
        return MergeResult(mid, "merged", body=merger.compress(message))

    def shutdown(self) -> None:
        with self.db.transaction():
            n = self.db.execute("my_batches_hand_back_messages", {"worker": self.worker_id})
            self.db.execute("my_batches_mark_reclaimed", {"worker": self.worker_id})
        if n:
            log.info("sort worker %s handed back %d messages", self.options.name, n)
