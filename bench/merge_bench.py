# ruff: noqa: E501  (the newsletter HTML has the long lines real ones have)
"""Merge throughput on one core: render + compress, as the sort worker does it.

    .venv/bin/python bench/merge_bench.py [--recipients 20000] [--demo] [--no-hoist] [--profile]
                                          [--send-side] [--child]
    .venv/bin/python bench/merge_bench.py --track [--child] [--no-hoist]

A realistic ~20 KB newsletter (HTML with a 10-article loop defined by
``{% set %}``, a text version, 5 merge fields) merged for N recipients with
distinct field values. Prints messages/s, mean stored (compressed) bytes per
message and peak RSS. Targets: >= 1,000 msgs/s and <= 8 KB stored per message.
``--send-side`` also times what the send worker does per message:
decompress + finalize + DKIM sign (2048-bit key from ``sendsystem.dkim.generate_key``).
``--child`` also runs the sort worker's path: the same recipients rendered in
its render child (render_child.py, under the default limits) in chunks of 200
over the pipe, timed from the parent; prints msgs/s, the parent's and the
child's peak RSS, and the child's CPU seconds per message.
``--demo`` merges the demo newsletter instead (sendsystem/demo/newsletter.py, the
one bench/pipeline.py sends: 10 article cards, each with two merge fields).
``--no-hoist`` renders every part per message, as written, instead of the
hoisted templates (sendsystem/hoisting.py: what is the same for every
recipient rendered once per newsletter); with hoisting the first 500 messages
are also checked to be byte-identical to the plain render. Besides msgs/s the
bench prints this process's CPU time per message (steadier on a shared machine).
``--track`` measures open and click tracking instead: the same newsletter with
a navigation bar and a footer of links added (30 links in all, one the
unsubscribe link), merged with tracking off and then on (every http link
rewritten to a signed /c/ token, the open pixel added; sendsystem/tracking),
in 20 rounds of 1,000 that alternate which goes first, so the drift of this
box's speed (10-20 % from one minute to the next, idle or not) hits both
alike; prints both rates and the slowdown of the speed (target: at most 20 %),
the same from CPU time (``process_time``), the median and range of the 20
rounds' slowdowns (the figure to hold against the target), the stored size,
and how many messages took the rewriter's fast path (a known template shape,
no link scan). With ``--child`` also through two render children, one per
setting, taking chunks of 200 in turn (their CPU from /proc).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sendsystem.demo.newsletter import sample_newsletter
from sendsystem.dkim import DkimSigner, generate_key
from sendsystem.merge import Merger, NewsletterInfo, TemplateSource, decompress
from sendsystem.mime import finalize

ARTICLES = "\n".join(
    f"""  {{"title": "Article {i}: {topic}", "url": "https://news.example.com/2024/{i}/{slug}",
     "teaser": "{teaser}"}},"""
    for i, (topic, slug, teaser) in enumerate(
        [
            (
                f"Nyt fra {place}",
                f"nyt-fra-{place.lower()}",
                f"Her kan du læse om hvad der sker i {place} denne måned: arrangementer, "
                "tilbud og historier fra vores medlemmer. Vi har samlet det vigtigste, så "
                "du hurtigt kan få overblikket over sæsonens højdepunkter og nyheder.",
            )
            for place in (
                "Aarhus",
                "Odense",
                "Aalborg",
                "Esbjerg",
                "Randers",
                "Kolding",
                "Horsens",
                "Vejle",
                "Roskilde",
                "Herning",
            )
        ],
        start=1,
    )
)

HTML = (
    """{% set articles = [
"""
    + ARTICLES
    + """
] %}<!DOCTYPE html>
<html lang="da">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ newsletter.subject }}</title>
<style type="text/css">
  body { margin: 0; padding: 0; background-color: #f4f4f4; font-family: Helvetica, Arial, sans-serif; }
  table { border-collapse: collapse; }
  .wrapper { width: 100%; background-color: #f4f4f4; padding: 20px 0; }
  .content { width: 600px; background-color: #ffffff; margin: 0 auto; }
  .header { background-color: #003366; color: #ffffff; padding: 24px; font-size: 24px; }
  .article { padding: 16px 24px; border-bottom: 1px solid #e0e0e0; }
  .article h2 { font-size: 18px; color: #003366; margin: 0 0 8px 0; }
  .article p { font-size: 14px; line-height: 20px; color: #333333; margin: 0 0 8px 0; }
  .button { display: inline-block; background-color: #ff6600; color: #ffffff; padding: 8px 16px; text-decoration: none; border-radius: 4px; }
  .footer { padding: 24px; font-size: 12px; color: #888888; text-align: center; }
  @media only screen and (max-width: 620px) { .content { width: 100% !important; } }
</style>
</head>
<body>
<table class="wrapper" role="presentation" width="100%" cellpadding="0" cellspacing="0">
<tr><td align="center">
<table class="content" role="presentation" width="600" cellpadding="0" cellspacing="0">
<tr><td class="header">{{ list.name }}</td></tr>
<tr><td class="article">
<p>Kære {{ first_name }} {{ last_name }},</p>
<p>Tak fordi du har været medlem siden {{ member_since }}. Som {{ plan }}-medlem i {{ city }}
får du denne måned ekstra fordele hos vores partnere. Læs mere nedenfor.</p>
</td></tr>
{% for a in articles %}
<tr><td class="article">
<h2><a href="{{ a.url }}?utm_source=newsletter&amp;utm_medium=email&amp;utm_campaign={{ newsletter.id }}" style="color: #003366; text-decoration: none;">{{ a.title }}</a></h2>
<p>{{ a.teaser }}</p>
<p>{{ a.teaser }}</p>
<p><a class="button" href="{{ a.url }}?utm_source=newsletter&amp;utm_medium=email&amp;utm_campaign={{ newsletter.id }}" style="background-color: #ff6600; color: #ffffff; padding: 8px 16px; text-decoration: none;">Læs hele artiklen</a></p>
</td></tr>
{% endfor %}
<tr><td class="footer">
<p>Du modtager denne e-mail fordi {{ email }} er tilmeldt {{ list.name }}.<br>
{{ list.from_name }} &middot; Eksempelvej 1 &middot; 8000 Aarhus C &middot; Danmark</p>
<p><a href="{{ unsubscribe_url }}" style="color: #888888;">Afmeld nyhedsbrevet</a></p>
</td></tr>
</table>
</td></tr>
</table>
</body>
</html>
"""
)

TEXT = (
    """{% set articles = [
"""
    + ARTICLES
    + """
] %}Kære {{ first_name }} {{ last_name }},

Tak fordi du har været medlem siden {{ member_since }}. Som {{ plan }}-medlem i {{ city }}
får du denne måned ekstra fordele hos vores partnere. Læs mere nedenfor.
{% for a in articles %}
{{ a.title }}
{{ "-" * a.title|length }}
{{ a.teaser }}
Læs mere: {{ a.url }}?utm_source=newsletter&utm_medium=email&utm_campaign={{ newsletter.id }}
{% endfor %}
--
Du modtager denne e-mail fordi {{ email }} er tilmeldt {{ list.name }}.
Afmeld: {{ unsubscribe_url }}
"""
)

SUBJECT = "{{ first_name }}, her er {{ list.name }} for {{ city }}"

FIRST = ["Søren", "Anna", "Mette", "Jens", "Lars", "Kirsten", "Åse", "Peter", "Hanne", "Bjørn"]
LAST = ["Jensen", "Nielsen", "Hansen", "Pedersen", "Andersen", "Christensen", "Larsen", "Sørensen"]
CITIES = ["Aarhus", "København", "Odense", "Aalborg", "Esbjerg", "Randers", "Kolding", "Ærøskøbing"]
PLANS = ["Basis", "Plus", "Premium"]


def recipient(i: int) -> tuple[str, dict[str, str], str]:
    fields = {
        "first_name": FIRST[i % len(FIRST)],
        "last_name": LAST[(i // 10) % len(LAST)],
        "city": CITIES[(i // 7) % len(CITIES)],
        "member_since": str(1990 + i % 34),
        "plan": PLANS[i % len(PLANS)],
    }
    email = f"user{i}.{fields['last_name'].lower().replace('ø', 'oe')}@example{i % 97}.com"
    unsub = f"https://lists.example.com/u/{i:x}.{i * 7919 % 100000:x}.Q2hhbmdlTWVQbGVhc2VIZWxsbw"
    return email, fields, unsub


NAV = ('<tr><td class="article">' + " | ".join(
    f'<a href="https://www.example.dk/{p}?utm_source=newsletter">{p.title()}</a>'
    for p in ("forside", "medlemmer", "arrangementer", "butik", "kontakt")) + "</td></tr>\n")
FOOTER = ('<p>' + " &middot; ".join(
    f'<a href="https://{host}/foreningen">{name}</a>'
    for host, name in (("www.facebook.com", "Facebook"), ("www.instagram.com", "Instagram"),
                       ("www.linkedin.com", "LinkedIn"), ("www.example.dk/privatliv",
                                                          "Privatlivspolitik"))) + "</p>\n")


def linky_html() -> str:
    """The bench HTML with 9 more links: 10 articles x 2 + 5 + 4 + unsubscribe = 30."""
    html = HTML.replace('<tr><td class="header">{{ list.name }}</td></tr>\n',
                        '<tr><td class="header">{{ list.name }}</td></tr>\n' + NAV, 1)
    return html.replace('<p><a href="{{ unsubscribe_url }}"', FOOTER + '<p><a href="{{ unsubscribe_url }}"', 1)


def track_bench(args: argparse.Namespace) -> None:
    """Tracking off vs on, same newsletter, alternating rounds (see the module docstring)."""
    from sendsystem.tracking.links import Rewriter, skip_prefixes
    from sendsystem.tracking.tokens import Signer, tracking_key

    html = linky_html()
    src = TemplateSource(subject=SUBJECT, html=html, text=TEXT)
    info = NewsletterInfo(newsletter_id=4711, list_name="Medlemsnyt",
                          from_header="Foreningen Ærø <nyhedsbrev@example.dk>")
    base = "https://lists.example.com"
    key = tracking_key(b"bench-secret-" + b"x" * 32)
    signer = Signer(key)

    def tracker() -> Rewriter:
        return Rewriter(signer, 4711, base + "/c/", base + "/o/",
                        skip_prefixes("https://lists.example.com/u/{token}", base + "/c/",
                                      base + "/o/"))

    off = Merger(src, info, hoist=not args.no_hoist)
    # Its own dictionary, as the sort worker computes it (it holds the rewritten links).
    on = Merger(src, info, tracker=tracker(), hoist=not args.no_hoist)
    people = [recipient(i) for i in range(args.recipients)]
    # QP may break a line inside a URL; the tokens' path is short enough not to be split.
    tracked = on.render(*people[0], message_id=1).count(b"/c/")
    times = {"off": 0.0, "on": 0.0}
    cpu = {"off": 0.0, "on": 0.0}
    stored = {"off": 0, "on": 0}
    # Many short rounds, alternating which goes first: this box's speed drifts by 10-20 %
    # from minute to minute, and each round's pair sees the same drift.
    rounds = 20
    chunk = max(1, len(people) // rounds)
    per_round: list[float] = []
    for r in range(rounds):
        part = people[r * chunk:(r + 1) * chunk]
        took: dict[str, float] = {}
        for label, merger in (("off", off), ("on", on)) if r % 2 == 0 else (("on", on),
                                                                               ("off", off)):
            t0, c0 = time.perf_counter(), time.process_time()
            for i, (email, fields, unsub) in enumerate(part):
                blob = merger.compress(merger.render(email, fields, unsub,
                                                     message_id=r * chunk + i + 1))
                stored[label] += len(blob)
            times[label] += time.perf_counter() - t0
            took[label] = time.process_time() - c0
            cpu[label] += took[label]
        per_round.append(1 - took["off"] / took["on"])
    n = chunk * rounds
    rate_off, rate_on = n / times["off"], n / times["on"]
    print(f"python {sys.version.split()[0]}, {n} recipients, {tracked} links rewritten + the "
          "open pixel (the unsubscribe link left alone)")
    print(f"tracking off           {rate_off:,.0f} msgs/s, {stored['off'] / n:,.0f} stored "
          "bytes/msg")
    print(f"tracking on            {rate_on:,.0f} msgs/s, {stored['on'] / n:,.0f} stored "
          "bytes/msg")
    print(f"slowdown               {(1 - rate_on / rate_off) * 100:.1f} % of the speed "
          "(target <= 20 %)")
    print(f"CPU per message        off {cpu['off'] / n * 1e6:,.0f} us, on {cpu['on'] / n * 1e6:,.0f} us:"
          f" slowdown {(1 - cpu['off'] / cpu['on']) * 100:.1f} % (this process only)")
    print(f"per round of {chunk:,}     slowdown median {statistics.median(per_round) * 100:.1f} %,"
          f" from {min(per_round) * 100:.1f} to {max(per_round) * 100:.1f} % (by CPU; the "
          "target's figure: each round's pair sees the same drift of this box's speed)")
    rewriter = on.tracker
    assert rewriter is not None
    print(f"links found by shape   {rewriter.fast_renders:,} of "
          f"{rewriter.fast_renders + rewriter.full_scans:,} messages (the rest by the full scan)")
    print(f"peak RSS               {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB")
    if args.child:
        from sendsystem.render_child import TrackingJob

        job_t = TrackingJob(key=key,
                            click_base=base + "/c/", open_base=base + "/o/",
                            skip_prefixes=skip_prefixes("https://lists.example.com/u/{token}",
                                                        base + "/c/", base + "/o/"),
                            opens=True, clicks=True)
        child = child_rates(src, info, people, {"off": None, "on": job_t}, not args.no_hoist)
        for label in ("off", "on"):
            print(f"via render child, {label:<3}  {child[label][0]:,.0f} msgs/s, child CPU "
                  f"{child[label][1] * 1e6:,.0f} us/msg")
        print(f"via render child       slowdown {(1 - child['on'][0] / child['off'][0]) * 100:.1f} %,"
              f" by child CPU {(1 - child['off'][1] / child['on'][1]) * 100:.1f} % (chunks of "
              "200 alternating between the two children)")


def child_rates(src: TemplateSource, info: NewsletterInfo,
                people: list[tuple[str, dict[str, str], str]], trackings: dict[str, object],
                hoist: bool = True) -> dict[str, tuple[float, float]]:
    """Per label: messages per second through a render child of its own, and that child's
    CPU seconds per message; the children take chunks of 200 in turn (the same drift)."""
    import json

    from sendsystem.render_child import (
        NewsletterJob,
        RenderLimits,
        RenderProcess,
        process_cpu_seconds,
    )

    rows = [(i + 1, e, json.dumps(f), u) for i, (e, f, u) in enumerate(people)]
    procs = {}
    for label, tracking in trackings.items():
        rp = RenderProcess(RenderLimits(hoist=hoist), lambda: None)
        job = NewsletterJob(info.newsletter_id, src, info, tracking=tracking)  # type: ignore[arg-type]
        rp.dictionary(job)
        assert rp.pid is not None
        procs[label] = (rp, job)
    cpu = {label: process_cpu_seconds(rp.pid) or 0.0 for label, (rp, _) in procs.items()
           if rp.pid is not None}
    wall = dict.fromkeys(procs, 0.0)
    merged = dict.fromkeys(procs, 0)
    for start in range(0, len(rows), 200):
        for label, (rp, job) in procs.items():
            t0 = time.perf_counter()
            done = list(rp.render(job, rows[start:start + 200]))
            wall[label] += time.perf_counter() - t0
            merged[label] += sum(r.state == "merged" for r in done)
    out = {}
    for label, (rp, _) in procs.items():
        assert rp.pid is not None
        used = (process_cpu_seconds(rp.pid) or 0.0) - cpu[label]
        rp.close()
        assert merged[label] == len(rows)
        out[label] = (len(rows) / wall[label], used / len(rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the loop")
    parser.add_argument("--send-side", action="store_true", help="time decompress+finalize+DKIM")
    parser.add_argument("--child", action="store_true", help="also through the render child")
    parser.add_argument("--track", action="store_true",
                        help="tracking off vs on (a 30-link newsletter)")
    parser.add_argument("--demo", action="store_true",
                        help="the demo newsletter (sendsystem/demo/newsletter.py)")
    parser.add_argument("--no-hoist", action="store_true",
                        help="render every part per message as written (no hoisting)")
    args = parser.parse_args()
    if args.track:
        track_bench(args)
        return

    if args.demo:
        demo = sample_newsletter()
        src = TemplateSource(subject=demo.subject, html=demo.html, text=demo.text)
    else:
        src = TemplateSource(subject=SUBJECT, html=HTML, text=TEXT)
    info = NewsletterInfo(
        newsletter_id=4711,
        list_name="Medlemsnyt",
        from_header="Foreningen Ærø <nyhedsbrev@example.dk>",
        has_attachments=False,
    )
    t0 = time.perf_counter()
    merger = Merger(src, info, hoist=not args.no_hoist)
    setup = time.perf_counter() - t0
    people = [recipient(i) for i in range(args.recipients)]
    if not args.no_hoist:
        plain = Merger(src, info, zdict=merger.zdict, hoist=False)
        assert all(plain.render(*p) == merger.render(*p) for p in people[:500]), "hoisting"

    sample = merger.render(*people[0])
    profiler = cProfile.Profile() if args.profile else None
    stored_total = 0
    raw_total = 0
    blobs: list[bytes] = []
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for email, fields, unsub in people:
        raw = merger.render(email, fields, unsub)
        blob = merger.compress(raw)
        stored_total += len(blob)
        raw_total += len(raw)
        if args.send_side and len(blobs) < 2000:
            blobs.append(blob)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    c0 = time.process_time()
    for email, fields, unsub in people:
        merger.render(email, fields, unsub)
    render_cpu = time.process_time() - c0

    blob = merger.compress(sample)
    assert decompress(blob, merger.zdict) == sample
    n = args.recipients
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"python {sys.version.split()[0]}, {n} recipients, merger setup {setup * 1000:.1f} ms")
    print(f"raw message size       {raw_total / n:,.0f} bytes (mean)")
    print(f"stored (compressed)    {stored_total / n:,.0f} bytes/message (mean)")
    print(f"zdict                  {len(merger.zdict):,} bytes")
    hoisted = ", ".join(f"{part} {h.constant_chars:,} chars/{h.units} units"
                        for part, h in merger.hoisted.items()) or "off"
    print(f"hoisted (constant/dyn) {hoisted}")
    print(f"render+compress        {n / elapsed:,.0f} msgs/s on one core ({elapsed:.2f} s)")
    print(f"CPU per message        {cpu / n * 1e6:,.0f} us render+compress ({n / cpu:,.0f} msgs/s "
          f"per CPU-second), {render_cpu / n * 1e6:,.0f} us render only")
    print(f"peak RSS               {peak_kb / 1024:.1f} MB")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    if args.send_side:
        send_side(blobs, merger.zdict)
    if args.child:
        child_side(src, info, people, not args.no_hoist)


def child_side(src: TemplateSource, info: NewsletterInfo,
               people: list[tuple[str, dict[str, str], str]], hoist: bool = True) -> None:
    import json

    from sendsystem.render_child import (
        NewsletterJob,
        RenderLimits,
        RenderProcess,
        process_cpu_seconds,
    )

    def vm_hwm(pid: int) -> float:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    rp = RenderProcess(RenderLimits(hoist=hoist), lambda: None)
    job = NewsletterJob(info.newsletter_id, src, info)
    rp.dictionary(job)
    rows = [(i, e, json.dumps(f), u) for i, (e, f, u) in enumerate(people)]
    assert rp.pid is not None
    cpu0 = process_cpu_seconds(rp.pid) or 0.0
    merged = 0
    t0 = time.perf_counter()
    for start in range(0, len(rows), 200):
        merged += sum(r.state == "merged" for r in rp.render(job, rows[start:start + 200]))
    elapsed = time.perf_counter() - t0
    child_cpu = (process_cpu_seconds(rp.pid) or 0.0) - cpu0
    n = len(rows)
    assert merged == n
    print(f"via render child       {n / elapsed:,.0f} msgs/s ({elapsed:.2f} s), child CPU "
          f"{child_cpu / n * 1e6:,.0f} us/message")
    print(f"peak RSS parent/child  {vm_hwm(os.getpid()):.1f} MB / {vm_hwm(rp.pid):.1f} MB")
    rp.close()


def send_side(blobs: list[bytes], zdict: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "dkim.pem"
        generate_key(key)
        signer = DkimSigner.from_file("example.dk", "s2024", key)
    headers = [
        ("Message-ID", "<1.4711.abcdef@mail.example.dk>"),
        ("Date", "Mon, 01 Jan 2024 10:00:00 +0000"),
        ("List-Unsubscribe", "<mailto:u@example.dk?subject=t>, <https://lists.example.com/u/t>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("List-Id", '"Medlemsnyt" <4711.lists.example.dk>'),
        ("Precedence", "bulk"),
    ]
    t0 = time.perf_counter()
    for blob in blobs:
        finalize(decompress(blob, zdict), b"", headers)
    t1 = time.perf_counter()
    for blob in blobs:
        signer.sign(finalize(decompress(blob, zdict), b"", headers))
    t2 = time.perf_counter()
    n = len(blobs)
    print(f"decompress+finalize    {n / (t1 - t0):,.0f} msgs/s")
    print(f"  + DKIM sign          {n / (t2 - t1):,.0f} msgs/s")


if __name__ == "__main__":
    main()
