"""The demo's closing summary, checked against the counting sink, and its result."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..states import MessageState
from .cluster import Restart, RoleSpec
from .sink import CountingSink


@dataclass(frozen=True)
class DemoResult:
    ok: bool
    delivered: int
    duplicates: int
    missing: int
    seconds: float
    report: Path


def summarize(say: Callable[[str], None], facts: Mapping[str, Any], emails: list[str],
              sink: CountingSink | None, seconds: float, finished: bool, report: Path,
              codes: Mapping[RoleSpec, int | None],
              restarts: Sequence[Restart]) -> DemoResult:
    """Print the summary through ``say``; OK only if every recipient got exactly one.

    With an external relay (no ``sink``) only the database's word is available,
    so the summary says what it checked and claims nothing about duplicates.
    """
    n = len(emails)
    c = facts["counts"]
    if sink is not None:
        got = sink.counts()
        expected = {e.lower() for e in emails}
        delivered = sum(1 for e in expected if got.get(e, 0) >= 1)
        duplicates = sum(v - 1 for e, v in got.items() if v > 1)
        unexpected = sum(v for e, v in got.items() if e not in expected)
        checked = "checked against the SMTP sink"
    else:
        delivered, duplicates, unexpected = int(c[MessageState.SENT]), 0, 0
        checked = "from the database (external relay: duplicates cannot be seen)"
    missing = n - delivered
    ok = finished and missing == 0 and duplicates == 0 and unexpected == 0 and \
        int(c[MessageState.SENT]) == n
    say("")
    say("Summary")
    say(f"  delivered      {delivered:,} of {n:,} recipients, {checked}")
    say(f"  duplicates     {duplicates:,}   missing {missing:,}   unexpected {unexpected:,}")
    say("  states         " + ", ".join(f"{k} {v:,}" for k, v in c.items() if v))
    rate = int(c[MessageState.SENT]) / seconds if seconds > 0 else 0.0
    say(f"  time           {seconds:.1f}s from enqueue to the last message  "
        f"({rate:,.0f} messages/s, {rate * 3600 / 1e6:.2f} M/hour)")
    if sink is not None and sink.tally.messages:
        say(f"  message size   {sink.tally.bytes / sink.tally.messages / 1024:.1f} KB on "
            f"average over {sink.tally.connections} SMTP connections")
    for role in ("sort", "send"):
        workers = [w for w in facts["workers"] if w["role"] == role]
        total = sum(w["messages"] for w in workers) or 1
        shares = "   ".join(f"{w['name']} {w['messages']:,} ({w['messages'] / total:.0%}"
                             + (f", {w['rate']:,.0f}/s)" if w["rate"] else ")")
                             for w in workers)
        say(f"  {role} workers   {shares or '-'}")
    bad = {f"{r.command} {r.name}": code for r, code in codes.items() if code != 0}
    if bad:
        say(f"  exit status    not clean: {bad}")
    for r in restarts:
        say(f"  restarted      {r.role.command} {r.role.name} after exit status {r.code}: "
            f"{r.reason[:160]}")
    say(f"  HTML report    {report}")
    if sink is None:
        # The relay's side cannot be counted here: claim only what the database says.
        say("Result: " + ("OK - every message was accepted by the relay (duplicates cannot be "
                          "counted at an external relay)." if ok else
                          "FAILED - not every message was accepted by the relay."))
    else:
        say("Result: " + ("OK - every recipient got exactly one message." if ok else
                          "FAILED - not every recipient got exactly one message."))
    return DemoResult(ok=ok, delivered=delivered, duplicates=duplicates, missing=missing,
                      seconds=seconds, report=report)
