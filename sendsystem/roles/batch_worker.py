"""What the sort and send workers share: batches handed to them by their balancer.

A worker owns the batches assigned to it (``batches.state = 'assigned'``,
``worker_id`` = its row) and nothing else. The shape, on top of
:class:`~sendsystem.runner.Runner` (Mailman 3's runner base with its
``_dispose`` hook is the model):

* ``work()`` (the role's own) goes through :meth:`BatchWorker.my_batches` and
  marks each one done when no row of it is left (:meth:`mark_done`).
* The heartbeat reports the measured rate (:class:`RateMeter`: messages per
  *busy* second, so idling does not make a worker look slow) and the backlog
  (rows still in its batches); the balancer sizes batches by both.
* ``--once`` ends when the worker holds no batch and nothing is left that
  could still reach its role (``pending_states``).
* On the way out it hands back what it has not done: the rows leave its
  batches (their state is kept, so the next worker picks them up as they
  are) and the batches are marked reclaimed, in one transaction, so the
  balancer need not wait for ``heartbeat_timeout``. Each role finishes or
  stops what it has in flight first (:meth:`before_hand_back`) and closes
  what it opened after (:meth:`after_hand_back`).
* ``--max-rate`` is a token bucket with a burst of :data:`LIMIT_BURST`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from ..config import Config
from ..ratemeter import RateMeter
from ..runner import Runner, RunOptions
from ..states import MessageState

log = logging.getLogger(__name__)

# The statements every batch worker uses; each role adds its own.
BATCH_STATEMENTS = ("my_batches", "my_backlog", "batch_mark_done", "newsletter_get",
                    "my_batches_hand_back_messages", "my_batches_mark_reclaimed",
                    "pending_for_role")

# burst=1: a capped worker must look like a slower server from its very first
# (probe) batch, or the balancer would over-trust it.
LIMIT_BURST = 1


class BatchWorker(Runner):
    """Base of the sort and send workers; see the module docstring."""

    # What may still reach this role (for --once): the balancer's pending states.
    pending_states: ClassVar[tuple[MessageState, ...]]

    def __init__(self, config: Config, options: RunOptions) -> None:
        super().__init__(config, options)
        self.meter = RateMeter()
        self.secret = config.secret()

    # -- hooks ------------------------------------------------------------------------

    def before_hand_back(self) -> None:
        """On the way out, before the batches go back: finish or stop what is in flight."""

    def after_hand_back(self) -> None:
        """On the way out, after the batches went back: close what the role opened."""

    # -- batches ----------------------------------------------------------------------

    def my_batches(self) -> list[dict[str, Any]]:
        """This worker's assigned batches (``id``, ``newsletter_id``), oldest first."""
        return self.db.fetchall("my_batches", {"worker": self.worker_id})

    def mark_done(self, batch: int) -> None:
        self.db.execute("batch_mark_done", {"batch": batch})

    def hand_back(self) -> int:
        """Give every row not yet done back to the balancer; how many went back."""
        with self.db.transaction():
            n = self.db.execute("my_batches_hand_back_messages", {"worker": self.worker_id})
            self.db.execute("my_batches_mark_reclaimed", {"worker": self.worker_id})
        if n:
            log.info("%s worker %s handed back %d messages", self.role, self.options.name, n)
        return n

    # -- Runner hooks -----------------------------------------------------------------

    def heartbeat_fields(self) -> dict[str, object]:
        backlog = int(self.db.fetchval("my_backlog", {"worker": self.worker_id}) or 0)
        return {"rate": self.meter.rate(), "backlog": backlog}

    def drained(self) -> bool:
        return not self.my_batches() and \
            not self.db.fetchval("pending_for_role", {"states": self.pending_states})

    def shutdown(self) -> None:
        self.before_hand_back()
        self.hand_back()
        self.after_hand_back()
