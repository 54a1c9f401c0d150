"""The recipient service: bounces, complaints and unsubscribes change who is mailed.

Shared by the send worker (a 5.1.x reply at send time is a hard bounce) and
the bounce intake. Thresholds come from ``[bounce]``: ``hard_limit`` hard
bounces, or ``soft_limit`` soft bounces within ``soft_window_days``, set
every subscription of the address to `bounced`. A complaint unsubscribes at
once and blocks the address. Every later newsletter skips them, including
messages already queued or merged (the sort and send workers check status
and blocklist per message).
"""

from __future__ import annotations

import logging

from .config import BounceConfig
from .db import Database

log = logging.getLogger(__name__)

RECIPIENT_STATEMENTS = ("bounce_insert", "bounce_tally", "subscribers_mark_bounced",
                        "message_mark_bounced")


def record_bounce(db: Database, limits: BounceConfig, *, email: str, kind: str,
                  message_id: int | None = None, subscriber_id: int | None = None,
                  status: str | None = None, diagnostic: str | None = None) -> bool:
    """Store one bounce (hard/soft/autoreply/...) and apply the thresholds.

    Returns True when the address crossed a threshold and is now `bounced`.
    """
    with db.transaction():
        db.execute("bounce_insert", {
            "message_id": message_id, "subscriber_id": subscriber_id, "email": email,
            "kind": kind, "status": status, "diagnostic": (diagnostic or "")[:1000] or None,
        })
        if kind == "hard" and message_id is not None:
            db.execute("message_mark_bounced", {"id": message_id})
        if kind not in ("hard", "soft"):
            return False
        tally = db.fetchone("bounce_tally", {"email": email, "days": limits.soft_window_days})
        hard = int(tally["hard"]) if tally else 0
        soft = int(tally["soft"]) if tally else 0
        if hard >= limits.hard_limit or soft >= limits.soft_limit:
            changed = db.execute("subscribers_mark_bounced", {"email": email})
            if changed:
                log.info("%s set to bounced (%d hard, %d soft bounces)", email, hard, soft)
            return bool(changed)
    return False
