"""Hostile templates, pure part: the sandbox's caps (render time) and the refusals of
`template add` (syntax tree), each naming the part and line; and the pause rules."""

from __future__ import annotations

import pytest

from sendsystem.brakes import RenderStreak, failure_rate_reason, render_failure_reason
from sendsystem.errors import TemplateError
from sendsystem.merge import (
    MAX_PART_CHARS,
    MergeError,
    Merger,
    NewsletterInfo,
    TemplateSource,
    check_template,
    compression_dictionary,
)

INFO = NewsletterInfo(newsletter_id=7, list_name="L", from_header="L <l@example.com>")
W = 999_999_999


def render_html(html: str, **fields: str) -> str:
    raw = Merger(TemplateSource("s", html, None), INFO).render("a@example.com", fields,
                                                               "https://u.example/x")
    return raw.decode()


# --- render-time caps: a width/size from data the template cannot see at add time ----

@pytest.mark.parametrize(("expr", "reason"), [
    ("'x'|center(w|int)", "width 999999999 in center is over the limit of 10,000"),
    ("'x'|indent(w|int)", "width 999999999 in indent"),
    ("'x'|wordwrap(w|int)", "width 999999999 in wordwrap"),
    ("{'a': 1}|tojson(w|int)", "width 999999999 in tojson indent"),
    ("('%' ~ w ~ 's')|format(1)", "width 999999999 in the format filter"),
    ("('%' ~ w ~ 's') % 1", "width 999999999 in a % format"),
    ("('%.' ~ w ~ 'f') % 1.5", "width 999999999 in a % format"),
    ("'%*s'|format(5, 1)", "a '*' width in the format filter is not allowed"),
    ("'x'.ljust(w|int)", "width 999999999 in str.ljust()"),
    ("'x'.rjust(w|int)", "width 999999999 in str.rjust()"),
    ("'x'.center(w|int)", "width 999999999 in str.center()"),
    ("'1'.zfill(w|int)", "width 999999999 in str.zfill()"),
    ("'a\\tb'.expandtabs(w|int)", "width 999999999 in str.expandtabs()"),
    ("('{:>' ~ w ~ '}').format(1)", "width 999999999 in a format field"),
    ("'{:{x}}'.format(1, x=w|int)", "width 999999999 in a format field"),
    ("('{a:.' ~ w ~ 'f}').format_map({'a': 1.5})", "width 999999999 in a format field"),
    ("('{:^' ~ w ~ '}'|safe).format(1)", "width 999999999 in a format field"),
    ("('x' * 1000)|replace('', 'y' * 5000)", "replace would build 5,006,000 characters"),
    ("('x' * 1000).replace('x', 'y' * 5000)", "str.replace() would build 5,000,000"),
    ("range(100000)|join('x' * 100)", "join would build 9,999,900"),
    ("('x' * 100).join(range(100000)|map('string'))", "str.join() would build 9,999,900"),
    ("[1]|batch(w|int, 'x')|list", "batch count 999999999 is over the limit"),
    ("[1]|slice(w|int)|list", "slice count 999999999 is over the limit"),
    ("'x' * (w|int)", "repetition result too large"),
    ("(10 ** 1000) ** 1000", "power result too large"),
    ("((10 ** 999) ** 30) * ((10 ** 999) ** 30)",
     "product too large"),
])
def test_render_caps_fail_the_message_with_part_line_and_reason(expr: str, reason: str) -> None:
    html = "<p>hello</p>\n<p>{{ " + expr + " }}</p>"
    with pytest.raises(MergeError, match=r"^html template, line 2: ") as info:
        render_html(html, w=str(W))
    assert reason in str(info.value)
    assert info.value.kind == "render"


def test_ordinary_widths_and_formats_still_work() -> None:
    out = render_html("{{ 'ab'|center(6) }}|{{ '%5s|%.2f' % ('a', 1.5) }}|"
                      "{{ '{:>4}|{x:^5}'.format(1, x='m') }}|{{ 'x'.ljust(3) }}|{{ '7'.zfill(3) }}|"
                      "{{ 'a b'|replace(' ', '-') }}|{{ ', '.join(['a', 'b']) }}|"
                      "{{ [1, 2, 3]|join('+') }}|{{ '%d%%'|format(50) }}|{{ 7 % 3 }}|"
                      "{{ 2 ** 10 }}|{{ [1, 2, 3]|batch(2, 0)|list }}")
    body = out.split("\r\n\r\n", 1)[1]
    for expected in ("  ab  ", "    a|1.50", "   1|  m  ", "x  ", "007", "a-b", "a, b",
                     "1+2+3", "50%", "|1|", "1024", "[[1, 2], [3, 0]]"):
        assert expected in body.replace("=\r\n", "").replace("=3D", "="), expected


def test_output_is_capped_while_it_streams_with_the_line() -> None:
    html = "<p>\n{% for a in range(100000) %}{% for b in range(100) %}xxxxxxxx{% endfor %}" \
           "{% endfor %}"
    with pytest.raises(MergeError, match=rf"^html template, line 2: output over "
                                         rf"{MAX_PART_CHARS:,} characters") as info:
        render_html(html)
    assert info.value.kind == "limit"


def test_dictionary_of_a_runaway_template_falls_back_to_the_source() -> None:
    html = "{% for a in range(100000) %}{% for b in range(100) %}xxxxxxxx{% endfor %}{% endfor %}"
    zdict = compression_dictionary(TemplateSource("s", html, None))
    assert b"range(100000)" in zdict


# --- add-time refusals: what the syntax tree already shows ---------------------------

@pytest.mark.parametrize(("html", "reason"), [
    ("{{ 'x'|center(999999999) }}", "width 999999999 in the center filter"),
    ("{{ 'x'|indent(width=50000) }}", "width 50000 in the indent filter"),
    ("{{ 'x'.ljust(10**9) }}", "width 1000000000 in str.ljust()"),
    ("{{ '%999999999s'|format(1) }}", "width 999999999 in the format filter"),
    ("{{ '%999999999s' % 1 }}", "width 999999999 in a % format"),
    ("{{ '{:>999999999}'.format(1) }}", "width 999999999 in a format field"),
    ("{{ 'x' * 10**7 }}", "repetition result too large"),
    ("{{ [1, 2] * 600000 }}", "repetition result too large"),
    ("{{ 2 ** 5000 }}", "exponent too large"),
    ("{{ [1]|batch(50000, 'x')|list }}", "batch count 50000"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
     "nested loops would run 10,000,000,000 times, over the limit of 10,000,000"),
    ("{% for a in range(1000) %}{% if a %}{% for b in range(100) %}{% for c in range(1000) %}"
     "{% endfor %}{% endfor %}{% endif %}{% endfor %}", "nested loops would run 100,000,000"),
    ("{% for a in range(10**6) %}{% endfor %}", "range of 1,000,000 items"),
])
def test_template_add_refuses_what_it_can_see(html: str, reason: str) -> None:
    src = TemplateSource("ok", "<p>fine</p>\n\n" + html, None)
    with pytest.raises(TemplateError, match=r"^html template, line 3: ") as info:
        check_template(src)
    assert reason in str(info.value)


def test_refusals_name_the_part() -> None:
    with pytest.raises(TemplateError, match=r"^subject template, line 1: width"):
        check_template(TemplateSource("{{ 'x'|center(99999) }}", "<p></p>", None))
    with pytest.raises(TemplateError, match=r"^text template, line 2: nested loops"):
        check_template(TemplateSource("s", "<p></p>", "\n{% for a in range(10000) %}"
                                      "{% for b in range(10000) %}{% endfor %}{% endfor %}"))


def test_template_add_accepts_ordinary_loops_and_widths() -> None:
    check_template(TemplateSource(
        "{{ '%-10s'|format(name) }}",
        "{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}"
        "{{ 'x'|center(80) }}{{ '{:>10}'.format(1) }}{{ 'x' * 1000 }}{{ 2 ** 64 }}"
        "{% for a in items %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "{{ name.ljust(20) }}{{ text|wordwrap(72) }}"))


# --- the pause rules ---------------------------------------------------------------

def test_render_streak_counts_failures_in_a_row_and_a_success_resets() -> None:
    s = RenderStreak(limit=3)
    assert not s.failure("a") and not s.failure("b")
    s.success()
    assert not s.failure("c") and not s.failure("d")
    assert s.failure("html template, line 3: render took more than 2 s of CPU")
    assert s.reason.startswith("paused automatically: 3 messages in a row failed to render; "
                               "last: html template, line 3: render took more than 2 s of CPU")
    assert RenderStreak(limit=0, count=100).tripped is False
    assert RenderStreak(limit=5, count=4).failure("x")
    assert len(render_failure_reason(5, "x" * 1000)) == 500


def test_failure_rate_reason() -> None:
    assert failure_rate_reason(10, 199, 0.5, 200) is None
    assert failure_rate_reason(99, 200, 0.5, 200) is None
    reason = failure_rate_reason(100, 200, 0.5, 200)
    assert reason is not None and "100 of 200 deliveries failed (50% >= 50%)" in reason
