"""`sendsystem sort-worker`: the SortingSystem.

Takes its own batches, merges each queued message with the subscriber's
data and stores the compressed result as `merged`. Recipients who are
unsubscribed, bounced, complained or blocked become `skipped`; a render
error fails that one message with its reason, never the batch. Results are
written per chunk in one transaction, and only for rows still ours.

Customer templates never run in this process: they render in a child
process under CPU, memory and wall-clock limits (render_child.py), which
sends each message back as soon as it is done while this process waits in
short polls and keeps heartbeating. So a template that never ends or eats
memory fails its own messages with the reason; the worker is never
reclaimed for it and the other newsletters flow on.

The compression dictionary is computed once per newsletter, by the child
under the same limits, and stored (`newsletters.zdict`, first writer wins);
every worker uses the stored one, so a dictionary render that hit a limit
on one worker cannot make two workers disagree.

Render failures in a row pause the newsletter (brakes.py): the worker then
writes what it did, hands back the rest of its batches of that newsletter
(still queued, for a resume) and renders none of it. A pause by an admin
keeps its old meaning: in-flight batches finish.

Fencing: unlike the send worker, a sort worker cut off from the database
needs no self-fence. Its only effect is its write, and sort_mark writes only
rows still in the batch it names (a reclaimed batch's rows have left it), so
a zombie's late merge is dropped and the new owner's stands. Its connection
has the role processes' read timeout, so a dead host does not hang it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

from ..addresses import FromAddress
from ..brakes import RenderStreak
from ..merge import NewsletterInfo, TemplateSource
from ..ratelimit import RateLimiter
from ..ratemeter import RateMeter
from ..render_child import NewsletterJob, Rendered, RenderLimits, RenderProcess
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


def newsletter_job(row: Mapping[str, Any]) -> NewsletterJob:
    """What the render child needs for a newsletter row (from `newsletter_get`)."""
    src = TemplateSource(subject=row["subject"], html=row["html"], text=row["text"])
    info = NewsletterInfo(
        newsletter_id=int(row["id"]), list_name=row["list_name"],
        from_header=FromAddress(row["from_name"], row["from_address"]).header(),
        has_attachments=bool(row["attachment_count"]),
    )
    return NewsletterJob(int(row["id"]), src, info,
                         bytes(row["zdict"]) if row["zdict"] is not None else None)


class SortWorker(Runner):
    role = "sort"
    statements = ("my_batches", "my_backlog", "batch_mark_done", "newsletter_get",
                  "sort_batch_messages", "sort_mark", "my_batches_hand_back_messages",
                  "my_batches_mark_reclaimed", "pending_for_role", "newsletter_set_zdict",
                  "newsletter_zdict", "newsletter_render_state", "newsletter_set_render_failures",
                  "newsletter_pause", "batch_hand_back_messages")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.meter = RateMeter()
        # burst=1: a capped worker must look like a slower server from its
        # very first (probe) batch, or the balancer would over-trust it.
        # Paced per result as it comes back from the render child.
        self.limiter = RateLimiter(self.options.max_rate, burst=1)
        # Report progress (rate, results) about once a second even when capped.
        rate = self.options.max_rate
        self.chunk = CHUNK if rate is None else max(10, min(CHUNK, int(rate)))
        self.jobs: dict[int, NewsletterJob | None] = {}
        self.zdict_stored: set[int] = set()
        self.secret = self.config.secret()
        self.url_template = self.config.unsubscribe.url
        s = self.config.sorting
        self.renderer = RenderProcess(RenderLimits(s.render_timeout, s.render_memory_mb),
                                      self.heartbeat, name=f"sendsystem-render {self.options.name}")

    def setup(self) -> None:
        # A new interpreter takes ~0.5-1 s to start: not while a batch waits.
        self.renderer.start()

    def heartbeat_fields(self) -> dict[str, object]:
        backlog = int(self.db.fetchval("my_backlog", {"worker": self.worker_id}) or 0)
        return {"rate": self.meter.rate(), "backlog": backlog}

    def drained(self) -> bool:
        return not self.db.fetchall("my_batches", {"worker": self.worker_id}) and \
            not self.db.fetchval("pending_for_role", {"states": ("queued",)})

    def job_for(self, newsletter_id: int) -> NewsletterJob | None:
        if newsletter_id not in self.jobs:
            row = self.db.fetchone("newsletter_get", {"id": newsletter_id})
            job = newsletter_job(row) if row else None
            if job is not None and job.zdict is not None:
                self.zdict_stored.add(newsletter_id)
            self.jobs[newsletter_id] = job
        return self.jobs[newsletter_id]

    def ensure_dictionary(self, job: NewsletterJob) -> str | None:
        """Compute (in the child) and store the compression dictionary once; why not, or None.

        Nothing is rendered with a dictionary that is not the stored one.
        """
        nid = job.newsletter_id
        if nid in self.zdict_stored:
            return None
        computed, error = self.renderer.dictionary(job)
        if computed is None:
            return f"cannot build messages: {error or 'no compression dictionary'}"
        self.db.execute("newsletter_set_zdict", {"id": nid, "zdict": computed})
        stored = self.db.fetchval("newsletter_zdict", {"id": nid})
        if stored is not None and bytes(stored) != computed:
            # Another worker stored first (its dictionary render may have hit a
            # limit ours did not): use theirs, like every other worker.
            job.zdict = bytes(stored)
            self.renderer.forget(nid)
        self.zdict_stored.add(nid)
        return None

    def work(self) -> int:
        done = 0
        for batch in self.db.fetchall("my_batches", {"worker": self.worker_id}):
            bid, nid = int(batch["id"]), int(batch["newsletter_id"])
            while not self.stopping:
                streak = self.render_streak(nid)
                if streak is None:
                    self.hand_back(bid, nid)
                    break
                rows = self.db.fetchall("sort_batch_messages", {"batch": bid, "limit": self.chunk})
                if not rows:
                    self.db.execute("batch_mark_done", {"batch": bid})
                    break
                done += self.process(bid, nid, rows, streak)
            if self.stopping:
                break
        return done

    def render_streak(self, newsletter_id: int) -> RenderStreak | None:
        """The newsletter's render-failure streak, or None when it paused itself for it."""
        limit = self.config.sorting.render_failures_pause
        row = self.db.fetchone("newsletter_render_state", {"id": newsletter_id})
        count = int(row["render_failures"]) if row else 0
        streak = RenderStreak(limit, count)
        if row is not None and row["state"] == "paused" and streak.tripped:
            return None
        return streak

    def hand_back(self, batch: int, newsletter_id: int) -> None:
        """Give back the rest of a batch of a newsletter that paused itself."""
        with self.db.transaction():
            n = self.db.execute("batch_hand_back_messages", {"batch": batch})
            self.db.execute("batch_mark_done", {"batch": batch})
        if n:
            log.info("sort worker %s handed back %d messages of paused newsletter %s",
                     self.options.name, n, newsletter_id)

    def process(self, batch: int, newsletter_id: int, rows: list[dict[str, Any]],
                streak: RenderStreak) -> int:
        started = time.monotonic()
        job = self.job_for(newsletter_id)
        results: list[MergeResult] = []
        todo: list[tuple[int, str, str, str]] = []
        for row in rows:
            mid = int(row["id"])
            reason = skip_reason(row["status"], int(row["blocked"]))
            if reason:
                results.append(MergeResult(mid, "skipped", detail=reason))
            elif job is None:
                results.append(MergeResult(mid, "failed", detail="newsletter vanished"))
            else:
                token = unsubscribe_token(self.secret, int(row["subscriber_id"]),
                                          int(row["list_id"]))
                todo.append((mid, row["email"], row["fields"],
                             self.url_template.format(token=token)))
        initial = streak.count
        limited, limited_time = 0, 0.0
        if job is not None and todo:
            error = self.ensure_dictionary(job)
            rendered = self.renderer.render(job, todo) if error is None else iter(
                [Rendered(row[0], "failed", "render", detail=error[:500]) for row in todo])
            try:
                last = time.monotonic()
                for r in rendered:
                    self.limiter.acquire()
                    # Results that are already in the pipe never make the
                    # renderer wait (where it heartbeats): beat here too.
                    self.heartbeat()
                    now = time.monotonic()
                    if r.kind == "limit":
                        # Not this worker's speed: see the rate note in process().
                        limited += 1
                        limited_time += now - last
                    last = now
                    if r.state == "merged":
                        streak.success()
                        results.append(MergeResult(r.message_id, "merged", body=r.body))
                        continue
                    results.append(MergeResult(r.message_id, "failed", detail=r.detail))
                    # Only the template's failures count; a recipient's bad
                    # address or data does not say the template is broken.
                    if r.kind in ("render", "limit") and streak.failure(r.detail or "?"):
                        break
                    if self.stopping:
                        break
            finally:
                if isinstance(rendered, Generator):
                    rendered.close()  # cancels what the child has not done yet
        with self.db.transaction():
            if results:
                self.db.execute_values("sort_mark",
                                       [(r.message_id, r.state, r.body, r.detail)
                                        for r in results],
                                       {"batch": batch, "worker": self.worker_id})
            if streak.count != initial:
                self.db.execute("newsletter_set_render_failures",
                                {"id": newsletter_id, "n": min(streak.count, 65535)})
            if streak.tripped and self.db.execute(
                    "newsletter_pause", {"id": newsletter_id, "reason": streak.reason}):
                log.warning("newsletter %s %s", newsletter_id, streak.reason)
        if streak.tripped:
            self.hand_back(batch, newsletter_id)
        # The measured rate is what the balancer sizes batches by: time spent
        # on a render that hit a limit says nothing about the next newsletter
        # (that one pauses itself), so it is left out, with its messages.
        busy = time.monotonic() - started - limited_time
        if len(results) > limited and busy > 0:
            self.meter.busy(len(results) - limited, busy)
        self.processed += len(results)
        return len(results)

    def shutdown(self) -> None:
        self.renderer.close()
        with self.db.transaction():
            n = self.db.execute("my_batches_hand_back_messages", {"worker": self.worker_id})
            self.db.execute("my_batches_mark_reclaimed", {"worker": self.worker_id})
        if n:
            log.info("sort worker %s handed back %d messages", self.options.name, n)
