"""When a newsletter pauses itself, and the reason it gives: the one home of both rules.

A newsletter pauses itself rather than burn a sender's reputation or the
workers' time on something that is broken for every recipient:

- **Failure rate** (send balancer): ``[sending] failure_pause_ratio`` of the
  deliveries failed, after at least ``failure_pause_min`` of them (a broken
  list, a blacklisted relay).
- **Render failures in a row** (sort worker): ``[sorting]
  render_failures_pause`` messages in a row failed to render, by an error or
  a render limit (a template that never ends, eats memory, or names a field
  the list does not have). A message that renders resets the count;
  skipped recipients and unusable addresses do not count either way.

Both store their reason through the same ``newsletter_pause`` statement in
``newsletters.pause_reason``, which ``sendsystem stats`` and ``status``
show; ``newsletter resume`` (which also resets the render-failure count) or
``cancel`` is the operator's answer. Pure: the roles do the database part.
"""

from __future__ import annotations

from dataclasses import dataclass

PAUSE_REASON_MAX = 500  # newsletters.pause_reason is VARCHAR(500)


def failure_rate_reason(failed: int, attempted: int, ratio: float, minimum: int) -> str | None:
    """The pause reason when the delivery failure rate crossed the brake, else None."""
    if attempted < minimum or not attempted or failed / attempted < ratio:
        return None
    return (f"paused automatically: {failed} of {attempted} deliveries failed "
            f"({failed / attempted:.0%} >= {ratio:.0%}); check "
            "`sendsystem stats` for the replies, then resume or cancel")


def render_failure_reason(count: int, last: str) -> str:
    reason = (f"paused automatically: {count} messages in a row failed to render; last: "
              f"{last}. Fix the cause (the template is copied into the newsletter: cancel "
              "and enqueue a fixed one, or raise [sorting] render limits), or resume")
    return reason[:PAUSE_REASON_MAX]


@dataclass
class RenderStreak:
    """Render failures in a row for one newsletter; ``limit`` 0 never trips."""

    limit: int
    count: int = 0
    last: str = ""

    def success(self) -> None:
        self.count = 0

    def failure(self, detail: str) -> bool:
        """Count one render failure; True when the newsletter must pause now."""
        self.count += 1
        self.last = detail
        return self.tripped

    @property
    def tripped(self) -> bool:
        return self.limit > 0 and self.count >= self.limit

    @property
    def reason(self) -> str:
        return render_failure_reason(self.count, self.last)
