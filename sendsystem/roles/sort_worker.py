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
from ..config import Config, parse_track
from ..merge import NewsletterInfo, TemplateSource
from ..ratelimit import RateLimiter
from ..render_child import NewsletterJob, Rendered, RenderLimits, RenderProcess, TrackingJob
from ..runner import RunOptions
from ..states import SORT_PENDING, MessageState, NewsletterState, skip_reason
from ..tokens import unsubscribe_token
from ..tracking.links import skip_prefixes
from ..tracking.tokens import tracking_key
from .batch_worker import BATCH_STATEMENTS, LIMIT_BURST, BatchWorker

log = logging.getLogger(__name__)

CHUNK = 200


@dataclass(frozen=True)
class MergeResult:
    message_id: int
    state: MessageState  # MERGED, SKIPPED or FAILED
    body: bytes | None = None
    detail: str | None = None
    links: tuple[tuple[int, str], ...] = ()  # tracked links it used first


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


class SortWorker(BatchWorker):
    role = "sort"
    pending_states = SORT_PENDING
    statements = (*BATCH_STATEMENTS, "sort_batch_messages", "sort_mark", "newsletter_set_zdict",
                  "newsletter_zdict", "newsletter_render_state", "newsletter_set_render_failures",
                  "newsletter_pause", "batch_hand_back_messages", "newsletter_track",
                  "tracking_links_insert")

    def __init__(self, config: Config, options: RunOptions) -> None:
        super().__init__(config, options)
        # Paced per result as it comes back from the render child.
        self.limiter = RateLimiter(options.max_rate, burst=LIMIT_BURST)
        # Report progress (rate, results) about once a second even when capped.
        rate = options.max_rate
        self.chunk = CHUNK if rate is None else max(10, min(CHUNK, int(rate)))
        self.jobs: dict[int, NewsletterJob | None] = {}
        self.zdict_stored: set[int] = set()
        self.url_template = config.unsubscribe.url
        s = config.sorting
        self.renderer = RenderProcess(RenderLimits(s.render_timeout, s.render_memory_mb,
                                                   s.hoist_constants),
                                      self.heartbeat, name=f"sendsystem-render {options.name}")

    def setup(self) -> None:
        # A new interpreter takes ~0.5-1 s to start: not while a batch waits.
        self.renderer.start()

    def before_hand_back(self) -> None:
        self.renderer.close()

    def job_for(self, newsletter_id: int) -> NewsletterJob | None:
        if newsletter_id not in self.jobs:
            row = self.db.fetchone("newsletter_get", {"id": newsletter_id})
            job = newsletter_job(row) if row else None
            if job is not None:
                job.tracking = self.tracking_job(newsletter_id)
            if job is not None and job.zdict is not None:
                self.zdict_stored.add(newsletter_id)
            self.jobs[newsletter_id] = job
        return self.jobs[newsletter_id]

    def tracking_job(self, newsletter_id: int) -> TrackingJob | None:
        """The newsletter's open/click tracking, or None: ``[tracking] enabled`` wins, then
        what the newsletter was enqueued with (sendsystem/tracking/links.py)."""
        t = self.config.tracking
        if not t.enabled:
            return None
        kinds = parse_track(self.db.fetchval("newsletter_track", {"id": newsletter_id}) or "")
        if not kinds:
            return None
        return TrackingJob(
            key=tracking_key(self.secret), click_base=t.click_prefix, open_base=t.open_prefix,
            skip_prefixes=skip_prefixes(self.url_template, t.click_prefix, t.open_prefix),
            opens="opens" in kinds, clicks="clicks" in kinds, text_links=t.track_text_links,
            max_links=t.max_links)

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
        for batch in self.my_batches():
            bid, nid = int(batch["id"]), int(batch["newsletter_id"])
            while not self.stopping:
                streak = self.render_streak(nid)
                if streak is None:
                    self.hand_back_paused(bid, nid)
                    break
                rows = self.db.fetchall("sort_batch_messages", {"batch": bid, "limit": self.chunk})
                if not rows:
                    self.mark_done(bid)
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
        if row is not None and row["state"] == NewsletterState.PAUSED and streak.tripped:
            return None
        return streak

    def hand_back_paused(self, batch: int, newsletter_id: int) -> None:
        """Give back the rest of a batch of a newsletter that paused itself."""
        with self.db.transaction():
            n = self.db.execute("batch_hand_back_messages", {"batch": batch})
            self.mark_done(batch)
        if n:
            log.info("sort worker %s handed back %d messages of paused newsletter %s",
                     self.options.name, n, newsletter_id)

    def process(self, batch: int, newsletter_id: int, rows: list[dict[str, Any]],
                streak: RenderStreak) -> int:
        """Merge one chunk of a batch and write the results; how many were done."""
        started = time.monotonic()
        job = self.job_for(newsletter_id)
        results, todo = self.triage(rows, job)
        initial = streak.count
        limited, limited_time = 0, 0.0
        if job is not None and todo:
            limited, limited_time = self.render(job, todo, streak, results)
        try:
            self.store(batch, newsletter_id, results, streak, initial)
        except BaseException:
            # The child counts the links it reported as stored; they were not.
            # Reloading the newsletter there makes it report them again.
            self.renderer.forget(newsletter_id)
            raise
        if streak.tripped:
            self.hand_back_paused(batch, newsletter_id)
        # The measured rate is what the balancer sizes batches by: time spent
        # on a render that hit a limit says nothing about the next newsletter
        # (that one pauses itself), so it is left out, with its messages.
        busy = time.monotonic() - started - limited_time
        if len(results) > limited and busy > 0:
            self.meter.busy(len(results) - limited, busy)
        self.processed += len(results)
        return len(results)

    def triage(self, rows: list[dict[str, Any]], job: NewsletterJob | None
               ) -> tuple[list[MergeResult], list[tuple[int, str, str, str]]]:
        """The rows decided without rendering (skipped, or their newsletter is gone), and
        the rest as the render child takes them: (id, email, fields, unsubscribe URL)."""
        results: list[MergeResult] = []
        todo: list[tuple[int, str, str, str]] = []
        for row in rows:
            mid = int(row["id"])
            reason = skip_reason(row["status"], int(row["blocked"]))
            if reason:
                results.append(MergeResult(mid, MessageState.SKIPPED, detail=reason))
            elif job is None:
                results.append(MergeResult(mid, MessageState.FAILED, detail="newsletter vanished"))
            else:
                token = unsubscribe_token(self.secret, int(row["subscriber_id"]),
                                          int(row["list_id"]), job.newsletter_id)
                todo.append((mid, row["email"], row["fields"],
                             self.url_template.format(token=token)))
        return results, todo

    def render(self, job: NewsletterJob, todo: list[tuple[int, str, str, str]],
               streak: RenderStreak, results: list[MergeResult]) -> tuple[int, float]:
        """Render ``todo`` in the child, appending to ``results``; stops early when the
        streak trips or the worker stops. Returns the renders that hit a limit and the
        time they took (left out of the measured rate, see process())."""
        limited, limited_time = 0, 0.0
        error = self.ensure_dictionary(job)
        rendered = self.renderer.render(job, todo) if error is None else iter(
            [Rendered(row[0], MessageState.FAILED, "render", detail=error[:500])
             for row in todo])
        try:
            last = time.monotonic()
            for r in rendered:
                self.limiter.acquire()
                # Results that are already in the pipe never make the
                # renderer wait (where it heartbeats): beat here too.
                self.heartbeat()
                now = time.monotonic()
                if r.kind == "limit":
                    limited += 1
                    limited_time += now - last
                last = now
                if r.state == MessageState.MERGED:
                    streak.success()
                    results.append(MergeResult(r.message_id, MessageState.MERGED, body=r.body,
                                               links=r.links))
                    continue
                results.append(MergeResult(r.message_id, MessageState.FAILED, detail=r.detail))
                # Only the template's failures count; a recipient's bad
                # address or data does not say the template is broken.
                if r.kind in ("render", "limit") and streak.failure(r.detail or "?"):
                    break
                if self.stopping:
                    break
        finally:
            if isinstance(rendered, Generator):
                rendered.close()  # cancels what the child has not done yet
        return limited, limited_time

    def store(self, batch: int, newsletter_id: int, results: list[MergeResult],
              streak: RenderStreak, initial: int) -> None:
        """Write a chunk's results (only rows still in ``batch``) and the render streak, and
        pause the newsletter when the streak tripped: one transaction."""
        links = {(idx, url) for r in results for idx, url in r.links}
        with self.db.transaction():
            if links:
                # Before the messages that use them: a click can never find no row.
                self.db.execute_values("tracking_links_insert",
                                       [(newsletter_id, idx, url) for idx, url in sorted(links)])
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
