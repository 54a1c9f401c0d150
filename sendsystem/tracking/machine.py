"""Machine opens and clicks: the rule, pure and in one place.

A hit is human unless one of these says otherwise (the verdict stored with
the hit is the strongest that applies, in this order of confidence):

* ``BURST`` -- one of a recipient's clicks on ``burst_links`` or more distinct
  links within ``burst_seconds`` (default 3 links in 2 s). People open one link
  and read; link scanners (Microsoft Defender Safe Links, Proofpoint,
  Mimecast, Barracuda) fetch every link of a message at once, often from a
  browser-like user agent, so behaviour is the one signal they cannot hide.
  Every click of such a burst is machine; a click of the same recipient
  outside the burst stays human.
* ``SCANNER`` -- a known scanner or prefetcher by user agent (the list below:
  substrings, case-insensitive), a request without a user agent, or a HEAD
  request (browsers GET a link; checkers HEAD it).
* ``PROXY`` -- a mail-privacy or image proxy that fetches images for the
  reader: Apple Mail Privacy Protection (it loads every image of every
  message when it arrives, whether or not it is read, with the bare user
  agent ``Mozilla/5.0``), Yahoo's proxy, and Gmail's ``GoogleImageProxy``.
  Gmail's proxy fetches when the reader opens the message (the first time
  only; later opens hit its cache), so its opens are usually real: they are
  counted apart under ``proxy`` so a report can add them back, not dropped.
* ``EARLY`` -- within ``machine_seconds`` of the relay accepting the message
  (default 10 s): a gateway scanning on arrival, not a reader.

What cannot be told apart: a scanner that waits, uses a browser's user agent
and fetches one link (it looks like a person); Apple MPP fetching with a full
browser user agent (Apple documents no fixed one; we do not ship Apple's
egress IP list, and store no IP address at all); a person opening within
seconds of delivery (counted as machine). Opens are a lower bound of
interest, never a measure of reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum


class Verdict(IntEnum):
    HUMAN = 0
    EARLY = 1
    PROXY = 2
    SCANNER = 3
    BURST = 4


VERDICT_NAMES = {Verdict.EARLY: "early", Verdict.PROXY: "proxy", Verdict.SCANNER: "scanner",
                 Verdict.BURST: "burst"}

# Substrings of user agents (lower case). Kept short and maintained: each is a
# product that fetches mail links or images without a person.
SCANNER_AGENTS: tuple[str, ...] = (
    "barracuda", "proofpoint", "urldefense", "mimecast", "bingpreview", "safelinks",
    "microsoft defender", "ms-office-safelinks", "symantec", "messagelabs", "trendmicro",
    "forcepoint", "sophos", "ironport", "cisco-", "zscaler", "fortiguard", "checkpoint",
    "googlebot", "bot/", "bot;", "crawler", "spider", "headlesschrome", "phantomjs",
    "python-requests", "python-urllib", "aiohttp", "go-http-client", "java/", "okhttp",
    "libwww", "wget", "curl/", "slackbot", "facebookexternalhit", "linkedinbot",
    "twitterbot", "skypeuripreview", "whatsapp", "discordbot",
)
PROXY_AGENTS: tuple[str, ...] = ("googleimageproxy", "yahoomailproxy", "ymailproxy")
# Apple Mail Privacy Protection's fetches send exactly this.
APPLE_MPP_AGENTS: frozenset[str] = frozenset({"mozilla/5.0"})


def agent_verdict(method: str, user_agent: str | None) -> Verdict:
    """What the request itself shows (the web app calls this per hit)."""
    if method.upper() == "HEAD":
        return Verdict.SCANNER
    agent = (user_agent or "").strip().lower()
    if not agent:
        return Verdict.SCANNER
    if agent in APPLE_MPP_AGENTS or any(p in agent for p in PROXY_AGENTS):
        return Verdict.PROXY
    if any(s in agent for s in SCANNER_AGENTS):
        return Verdict.SCANNER
    return Verdict.HUMAN


def with_delivery(verdict: int, at: datetime, delivered_at: datetime | None,
                  machine_seconds: float) -> Verdict:
    """``verdict`` strengthened to EARLY when the hit came within ``machine_seconds`` of
    delivery (``delivered_at`` None: unknown, e.g. purged)."""
    v = Verdict(verdict)
    if v == Verdict.HUMAN and delivered_at is not None and machine_seconds > 0 \
            and at - delivered_at < timedelta(seconds=machine_seconds):
        return Verdict.EARLY
    return v


@dataclass(frozen=True)
class Click:
    key: object          # whatever identifies the hit to the caller (a row id)
    message_id: int
    link_idx: int
    at: datetime


def bursts(clicks: Iterable[Click], links: int, seconds: float) -> set[object]:
    """The keys of clicks that are part of a burst: within some window of ``seconds``
    one recipient clicked ``links`` or more distinct links. Every click inside such a
    window is machine; clicks outside it are not."""
    by_message: dict[int, list[Click]] = {}
    for c in clicks:
        by_message.setdefault(c.message_id, []).append(c)
    window = timedelta(seconds=seconds)
    out: set[object] = set()
    for group in by_message.values():
        if len({c.link_idx for c in group}) < links:
            continue
        group.sort(key=lambda c: c.at)
        _mark_bursts(group, links, window, out)
    return out


def _mark_bursts(group: Sequence[Click], links: int, window: timedelta, out: set[object]) -> None:
    end = 0
    for start in range(len(group)):
        end = max(end, start)
        while end + 1 < len(group) and group[end + 1].at - group[start].at <= window:
            end += 1
        inside = group[start:end + 1]
        if len({c.link_idx for c in inside}) >= links:
            out.update(c.key for c in inside)
