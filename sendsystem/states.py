"""Every state a row can be in, the sets of them that matter, and the rules that read them.

The enums' values are the database's ENUM values (sql/migrations/001_initial.sql),
and they are ``StrEnum``: a member *is* its string, so a row read from the
database compares equal to it (``row["state"] == MessageState.SENT``), it can
be a dict key for strings, and PyMySQL sends it as the string. SQL text in
sql/queries.sql names states as SQL literals; Python names them here.

Two rules read states, and each has its one home here:

* :func:`skip_reason`: why a recipient must not be mailed (their status is not
  ``active``, or their address or domain is blocked). The sort worker asks it
  before rendering and the send worker again right before sending, because a
  subscriber may unsubscribe or be blocked in between.
* :func:`worker_alive`: a worker is alive while its heartbeat (on the
  database's clock) is at most ``heartbeat_timeout`` old and it has not said
  it stopped. The balancer gives work only to live workers; ``status`` and
  ``workers list`` call the others dead (:func:`worker_dead`). The balancer's
  reclaim applies the same rule in SQL (``batches_reclaimable``,
  ``batch_mark_reclaimed``), where it must run under the row lock.
"""

from __future__ import annotations

from enum import StrEnum


class MessageState(StrEnum):
    """``messages.state``: one message's way through the pipeline."""

    QUEUED = "queued"        # created at release; waits for a sort worker
    MERGED = "merged"        # rendered and stored; waits for a send worker
    SENT = "sent"            # the relay said 250
    DEFERRED = "deferred"    # a temporary failure; retried after a back-off
    FAILED = "failed"        # a permanent failure, or gave up (max_age)
    SKIPPED = "skipped"      # not mailed: see skip_reason()
    BOUNCED = "bounced"      # sent, then a bounce came back for it
    CANCELLED = "cancelled"  # its newsletter was cancelled before it was sent


class WorkerState(StrEnum):
    """``workers.state``: what a role process last said about itself."""

    STARTING = "starting"
    RUNNING = "running"
    STANDBY = "standby"      # a balancer that does not hold its kind's lease
    STOPPING = "stopping"
    STOPPED = "stopped"


class BatchState(StrEnum):
    """``batches.state``: a batch is its worker's while ``assigned``."""

    ASSIGNED = "assigned"
    DONE = "done"
    RECLAIMED = "reclaimed"  # taken back (dead worker) or handed back (stopping worker)


class NewsletterState(StrEnum):
    """``newsletters.state``."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    DONE = "done"


class SubscriberStatus(StrEnum):
    """``subscribers.status``: only ``active`` subscribers are mailed."""

    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


# Every message state, in the order reports list them (the pipeline's order).
MESSAGE_STATES: tuple[MessageState, ...] = tuple(MessageState)

# A message in one of these states is finished: nothing will change it but a bounce.
FINAL_MESSAGE_STATES: frozenset[MessageState] = frozenset({
    MessageState.SENT, MessageState.FAILED, MessageState.SKIPPED, MessageState.BOUNCED,
    MessageState.CANCELLED,
})

# What may still reach a worker role (and its balancer): the sort role only
# takes queued messages; the send role also waits for what the sort role
# will merge, and for deferred retries.
SORT_PENDING: tuple[MessageState, ...] = (MessageState.QUEUED,)
SEND_PENDING: tuple[MessageState, ...] = (MessageState.QUEUED, MessageState.MERGED,
                                          MessageState.DEFERRED)


def skip_reason(status: str, blocked: int | bool) -> str | None:
    """Why a recipient must not be mailed, or None when they may be.

    ``status`` is ``subscribers.status``; ``blocked`` is true when the address
    or its domain is on the blocklist.
    """
    if status != SubscriberStatus.ACTIVE:
        return f"subscriber {status}"
    if blocked:
        return "address or domain blocked"
    return None


def worker_alive(state: str, heartbeat_age: float | None, heartbeat_timeout: float) -> bool:
    """True while a worker's heartbeat is at most ``heartbeat_timeout`` seconds old
    (``heartbeat_age`` on the database's clock, None: never) and it has not stopped."""
    return (state != WorkerState.STOPPED and heartbeat_age is not None
            and float(heartbeat_age) <= heartbeat_timeout)


def worker_dead(state: str, alive: bool) -> bool:
    """A worker that is not alive but never said it stopped: it is gone without a word
    (killed, host down, cut off). A cleanly stopped worker is not dead."""
    return not alive and state != WorkerState.STOPPED
