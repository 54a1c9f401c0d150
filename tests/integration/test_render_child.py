"""The render child with real processes: limits fail one message with its reason, a
stuck or dead child is replaced, and the parent keeps heartbeating throughout."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from sendsystem.merge import NewsletterInfo, TemplateSource, decompress
from sendsystem.render_child import NewsletterJob, Rendered, RenderLimits, RenderProcess

TIMEOUT = 0.5
NEVER_ENDS = ("<p>hi</p>\n{% for a in range(100000) %}{% for b in range(100000) %}"
              "{% endfor %}{% endfor %}")
# Doubles a string in a namespace: 2**40 characters if nothing stopped it.
EATS_MEMORY = ("{% set ns = namespace(s='x') %}\n{% for i in range(40) %}"
               "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}")
HEALTHY = "<p>Hej {{ first_name }}</p>"


def job(nid: int, html: str) -> NewsletterJob:
    return NewsletterJob(nid, TemplateSource("Nyt", html, None),
                         NewsletterInfo(nid, "L", "L <l@example.com>"))


def rows(start: int, n: int) -> list[tuple[int, str, str, str]]:
    return [(i, f"u{i}@example.com", json.dumps({"first_name": f"B{i}"}), "https://u.example/x")
            for i in range(start, start + n)]


class Beats:
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self) -> None:
        self.times.append(time.monotonic())

    def max_gap(self, since: float) -> float:
        points = [since, *[t for t in self.times if t >= since], time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(points))


@pytest.fixture
def renderer() -> Iterator[tuple[RenderProcess, Beats]]:
    beats = Beats()
    rp = RenderProcess(RenderLimits(timeout=TIMEOUT, memory_mb=512), beats)
    yield rp, beats
    rp.close()


def render(rp: RenderProcess, j: NewsletterJob, todo: list[tuple[int, str, str, str]]
           ) -> list[Rendered]:
    if j.zdict is None:
        zdict, error = rp.dictionary(j)
        assert error is None and zdict is not None
    return list(rp.render(j, todo))


def test_never_ending_template_fails_each_message_within_the_cpu_limit(renderer) -> None:  # type: ignore[no-untyped-def]
    rp, beats = renderer
    bad = job(1, NEVER_ENDS)
    started = time.monotonic()
    results = render(rp, bad, rows(0, 2))
    elapsed = time.monotonic() - started
    assert [r.state for r in results] == ["failed", "failed"]
    assert results[0].kind == "limit"
    assert results[0].detail == "html template, line 2: render took more than 0.5 s of CPU"
    # Dictionary (one part times out, falls back) + two renders: ~3 x 0.5 s of CPU.
    assert elapsed < 3 * rp.limits.watchdog
    assert beats.max_gap(started) < 0.5, "the parent must poll and heartbeat while it waits"
    pid = rp.pid
    good = render(rp, job(2, HEALTHY), rows(10, 3))
    assert [r.state for r in good] == ["merged"] * 3
    assert rp.pid == pid and rp.restarts == 0, "a CPU-limited render does not cost the child"


def test_memory_hungry_template_fails_with_a_memory_reason_and_the_child_goes_on(renderer) -> None:  # type: ignore[no-untyped-def]
    rp, _ = renderer
    results = render(rp, job(1, EATS_MEMORY), rows(0, 2))
    assert [r.state for r in results] == ["failed", "failed"]
    assert results[0].kind == "limit"
    detail = results[0].detail or ""
    assert detail.startswith("html template, line 2: ran out of memory "), detail
    assert "512 MB" in detail
    pid = rp.pid
    good = render(rp, job(2, HEALTHY), rows(10, 2))
    assert [r.state for r in good] == ["merged", "merged"] and rp.pid == pid


def test_results_are_the_real_messages_compressed_with_the_job_dictionary(renderer) -> None:  # type: ignore[no-untyped-def]
    rp, _ = renderer
    j = job(3, HEALTHY)
    results = render(rp, j, rows(0, 3))
    assert j.zdict is not None
    for r in results:
        assert r.body is not None
        raw = decompress(r.body, j.zdict)
        assert f"To: u{r.message_id}@example.com".encode() in raw
        assert f"Hej B{r.message_id}".encode() in raw


def test_a_render_stuck_in_c_is_killed_by_the_cpu_watchdog(renderer) -> None:  # type: ignore[no-untyped-def]
    """sum() of lists is quadratic and runs in C (~1 min here): the CPU alarm's
    handler cannot run until it returns, so the parent's watchdog (2 x 0.5 + 1 s
    of the child's CPU time) kills the child; only that message fails."""
    rp, beats = renderer
    j = job(11, "<p>{{ first_name }}</p>\n{% if first_name == 'B100' %}"
                "{{ ([[1] * 100] * 20000)|sum(start=[])|length }}{% endif %}")
    render(rp, j, [])
    stuck = rp.pid
    started = time.monotonic()
    results = list(rp.render(j, rows(99, 3)))
    elapsed = time.monotonic() - started
    assert [(r.message_id, r.state) for r in results] == [(99, "merged"), (100, "failed"),
                                                          (101, "merged")]
    assert results[1].kind == "limit"
    assert (results[1].detail or "").startswith(
        "rendering used more than 2 s of CPU without stopping; the render process was stopped")
    assert rp.pid != stuck and rp.restarts == 1
    assert elapsed < rp.limits.backstop + 30
    assert beats.max_gap(started) < 0.5


def test_a_stopped_child_is_killed_by_the_wall_clock_backstop(renderer) -> None:  # type: ignore[no-untyped-def]
    """A child that does not run at all (SIGSTOP here; swapped out, in practice)
    uses no CPU, so no CPU limit fires; the wall-clock backstop (5 x 2 s) does."""
    rp, beats = renderer
    j = job(4, "{% for i in range(30) %}{{ first_name }}{% endfor %}")
    render(rp, j, rows(0, 1))
    stuck = rp.pid
    assert stuck is not None
    os.kill(stuck, signal.SIGSTOP)
    started = time.monotonic()
    results = list(rp.render(j, rows(100, 4)))
    elapsed = time.monotonic() - started
    assert [r.state for r in results] == ["failed", "merged", "merged", "merged"]
    assert results[0].message_id == 100 and results[0].kind == "limit"
    assert (results[0].detail or "").startswith(
        "rendering made no progress in 10 s; the render process was stopped")
    assert rp.pid != stuck and rp.restarts == 1
    assert elapsed < rp.limits.backstop + 30  # + a new interpreter on a busy machine
    assert beats.max_gap(started) < 0.5
    # The stuck child is gone, not left behind.
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(stuck, 0)
            time.sleep(0.1)


def test_a_child_that_dies_fails_only_the_message_in_progress(renderer) -> None:  # type: ignore[no-untyped-def]
    rp, _ = renderer
    j = job(5, NEVER_ENDS)
    render(rp, j, [])  # loaded, dictionary computed
    victim = rp.pid
    assert victim is not None
    # Kill it while it renders the message (~0.5 s of CPU before its limit).
    threading.Timer(0.2, os.kill, (victim, signal.SIGKILL)).start()
    results = render(rp, j, rows(200, 1)) + render(rp, job(6, HEALTHY), rows(300, 2))
    assert results[0].state == "failed" and results[0].kind == "limit"
    assert "the render process died" in (results[0].detail or "")
    assert "signal 9" in (results[0].detail or "")
    assert [r.state for r in results[1:]] == ["merged", "merged"]
    assert rp.pid != victim


def test_closing_the_results_early_cancels_the_rest_of_the_chunk(renderer) -> None:  # type: ignore[no-untyped-def]
    rp, _ = renderer
    bad = job(7, NEVER_ENDS)
    render(rp, bad, [])
    started = time.monotonic()
    it = rp.render(bad, rows(0, 50))
    first = next(it)
    it.close()
    assert first.state == "failed"
    # Cancelled between two messages: at most one more render, not 49.
    assert time.monotonic() - started < 4 * TIMEOUT + 2
    good = render(rp, job(8, HEALTHY), rows(100, 2))
    assert [(r.message_id, r.state) for r in good] == [(100, "merged"), (101, "merged")]
    assert rp.restarts == 0


def test_a_template_that_does_not_compile_fails_its_messages_with_the_reason(renderer) -> None:  # type: ignore[no-untyped-def]
    rp, _ = renderer
    broken = job(9, "<p>\n{% if %}")
    zdict, error = rp.dictionary(broken)
    assert zdict is None and error is not None and "html template, line 2" in error
    results = list(rp.render(broken, rows(0, 2)))
    assert [r.state for r in results] == ["failed", "failed"]
    assert (results[0].detail or "").startswith("cannot build messages: html template, line 2")
