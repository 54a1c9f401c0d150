"""Subscriber status history: every change of a subscription's status leaves a row.

``list stats`` draws a list's subscribers over time from ``subscriber_events``
(migration 013). An event is written in the same transaction as the status
change it records, by the functions that change statuses
(:mod:`sendsystem.bounce.recipients` for unsubscribes, bounces and
complaints; :mod:`sendsystem.admin` for an admin's change;
:mod:`sendsystem.forget` for an erasure request): :func:`change` locks the
subscription, runs the caller's own UPDATE unchanged, and records the
transition only when the status really moved (an UPDATE that matched a row
already in that status writes nothing).

Decisions:

* **Joins are not events.** A subscription's join is its row's
  ``created_at``: ``list stats`` counts joins per week from an index on
  ``(list_id, created_at, status)``, so a 10-million-row import writes no
  event rows and costs no more than the index entry. (The subscriber row is
  never deleted: ``subscriber forget`` anonymises it, so a join is never lost.)
* **Statuses, not kinds.** An event stores ``from_status`` and ``to_status``;
  a week's counts by status follow from the joins and these transitions alone
  (:func:`sendsystem.liststats.weekly_series`), whatever transitions appear
  later (a re-activation would simply be ``-> active``).
* **A short reason**, for "why they left": ``unsubscribe link`` (our
  confirmation page), ``List-Unsubscribe one-click`` (RFC 8058 POST by the
  mailbox provider), ``unsubscribe email`` (mailto with a token), ``hard
  bounce 5.1.1`` / ``soft bounce 4.2.2`` (the report that crossed the
  threshold), ``complaint (ARF)`` (a feedback-loop report by mail),
  ``complaint (webhook)`` (an ESP's), ``admin``, ``erasure request``.
* **The newsletter** that caused it when that is known: the bounced or
  complained-about message's (only for its own list), the one an unsubscribe
  token names (tokens carry it since schema 13). Unsubscribes through links in
  older mail name none and are counted as unattributed; nothing is guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .db import Database
from .db.database import Params

log = logging.getLogger(__name__)

STATEMENTS = ("subscriber_lock", "subscribers_lock_active_by_email", "subscriber_event_insert")

UNSUBSCRIBE_LINK = "unsubscribe link"
ONE_CLICK = "List-Unsubscribe one-click"
UNSUBSCRIBE_EMAIL = "unsubscribe email"
COMPLAINT_ARF = "complaint (ARF)"
COMPLAINT_WEBHOOK = "complaint (webhook)"
ADMIN = "admin"
ERASURE = "erasure request"
# What migration 013 wrote for subscriptions that had left before there was a history.
BACKFILL = "before history (schema 13)"

_REASON_MAX = 100


def bounce_reason(kind: str, status: str | None) -> str:
    """``hard bounce 5.1.1``: the bounce that crossed the threshold, with its status."""
    return f"{kind} bounce {status}" if status else f"{kind} bounce"


def complaint_reason(evidence: str | None) -> str:
    return COMPLAINT_WEBHOOK if evidence == "webhook" else COMPLAINT_ARF


def record(db: Database, *, list_id: int, subscriber_id: int | None, from_status: str,
           to_status: str, reason: str, newsletter_id: int | None = None,
           message_id: int | None = None) -> None:
    """Insert one event (the caller holds the transaction that changed the status)."""
    db.execute("subscriber_event_insert", {
        "list_id": list_id, "subscriber_id": subscriber_id, "from_status": from_status,
        "to_status": to_status, "reason": reason[:_REASON_MAX],
        "newsletter_id": newsletter_id, "message_id": message_id,
    })


def change(db: Database, subscriber_id: int, statement: str, params: Params, *,
           to_status: str, reason: str, newsletter_id: int | None = None,
           message_id: int | None = None) -> bool:
    """Run ``statement`` (the UPDATE that moves this subscription to ``to_status``)
    and record the event when the status moved. Call inside a transaction.

    True when the statement changed the row (its own guard decides whether
    it applies, e.g. only from ``active``).
    """
    row = db.fetchone("subscriber_lock", {"id": subscriber_id})
    if row is None:
        return False
    # The event's reason is also the row's left_reason: one vocabulary.
    changed = bool(db.execute(statement, {**_mapping(params), "reason": reason[:_REASON_MAX]}))
    if changed and row["status"] != to_status:
        record(db, list_id=int(row["list_id"]), subscriber_id=subscriber_id,
               from_status=str(row["status"]), to_status=to_status, reason=reason,
               newsletter_id=newsletter_id, message_id=message_id)
    return changed


def change_active_by_email(db: Database, email: str, statement: str, params: Params, *,
                           to_status: str, reason: str,
                           message_id: int | None = None) -> int:
    """:func:`change` for every active subscription of an address (``[bounce] scope =
    address``); the statement must end exactly the active subscriptions of ``email``."""
    rows: list[dict[str, Any]] = db.fetchall("subscribers_lock_active_by_email",
                                             {"email": email})
    changed = db.execute(statement, {**_mapping(params), "reason": reason[:_REASON_MAX]})
    if changed != len(rows):
        log.warning("%s: %d subscriptions locked, %d changed", email, len(rows), changed)
    for row in rows:
        record(db, list_id=int(row["list_id"]), subscriber_id=int(row["id"]),
               from_status=str(row["status"]), to_status=to_status, reason=reason,
               message_id=message_id)
    return changed


def _mapping(params: Params) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise TypeError("status statements take named parameters")
    return dict(params)
