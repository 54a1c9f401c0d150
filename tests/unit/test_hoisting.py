"""Hoisting (sendsystem/hoisting.py): a hoisted template gives the same bytes as the
template as written, for every recipient, and fails the same way.

Every comparison builds two Mergers of one template, ``hoist=False`` (the reference)
and ``hoist=True``, and compares each recipient's stored message, or the MergeError's
kind and reason, or the TemplateError of building them. The hoisted Merger's re-render
of a failed message as written is switched off, so its own errors are compared.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendsystem import mime
from sendsystem.config import SortingConfig
from sendsystem.demo.newsletter import sample_newsletter
from sendsystem.errors import TemplateError
from sendsystem.merge import MergeError, Merger, NewsletterInfo, TemplateSource, decompress
from sendsystem.tracking.links import Rewriter, skip_prefixes
from sendsystem.tracking.tokens import Signer

INFO = NewsletterInfo(newsletter_id=42, list_name='Nyt <&> "x"',
                      from_header="Foreningen Ærø <nyt@example.dk>")
UNSUB = "https://lists.example.com/u/abc.def?x=1&y=2"
Outcome = bytes | tuple[str, str]


def outcome(merger: Merger, i: int, fields: dict[str, str], **kw: object) -> Outcome:
    try:
        return merger.render(f"r{i}@example.com", fields, f"{UNSUB}&i={i}", **kw)  # type: ignore[arg-type]
    except MergeError as exc:
        return (exc.kind, str(exc))


def assert_same(src: TemplateSource, recipients: list[dict[str, str]],
                info: NewsletterInfo = INFO) -> Merger | None:
    """Both Mergers give the same result for every recipient; the hoisted one."""
    try:
        plain = Merger(src, info, hoist=False)
    except TemplateError as exc:
        with pytest.raises(TemplateError) as again:
            Merger(src, info, hoist=True)
        assert str(again.value) == str(exc)
        return None
    fast = Merger(src, info, zdict=plain.zdict, hoist=True)
    # Internals on purpose: without the plain re-render of a failed hoisted render, so
    # that errors (and their lines) are compared too, not only the safety net.
    fast._plain = fast._fast
    for i, fields in enumerate(recipients):
        assert outcome(fast, i, fields) == outcome(plain, i, fields), (src, fields)
    return fast


PEOPLE = [
    {"first_name": "Søren", "last_name": "Ærø", "city": "Aarhus", "member_since": "1999",
     "plan": "Plus"},
    {"first_name": "<b>Bo & Co</b>", "last_name": "'\"", "city": "", "member_since": "2024",
     "plan": "<i>"},
    {"first_name": "", "last_name": "x", "city": "København", "member_since": "",
     "plan": "Basis"},
]


def test_the_demo_newsletter_is_hoisted_and_byte_identical() -> None:
    demo = sample_newsletter()
    fast = assert_same(TemplateSource(demo.subject, demo.html, demo.text), PEOPLE)
    assert fast is not None
    assert set(fast.hoisted) == {"subject", "html", "text"}
    # The article cards are literal text now; their two merge fields each run per card.
    assert fast.hoisted["html"].constant_chars > 10_000
    assert fast.hoisted["html"].units < 40
    # A missing field fails the same way, with the same line.
    assert assert_same(TemplateSource(demo.subject, demo.html, demo.text), [{"city": "x"}])


def demo_tracker() -> Rewriter:
    return Rewriter(Signer.from_secret(b"s" * 40), 42, "https://t.example.com/c/",
                    "https://t.example.com/o/",
                    skip_prefixes("https://lists.example.com/u/{token}",
                                  "https://t.example.com/c/", "https://t.example.com/o/"))


def test_the_demo_newsletter_with_tracking() -> None:
    demo = sample_newsletter()
    src = TemplateSource(demo.subject, demo.html, demo.text)
    plain = Merger(src, INFO, tracker=demo_tracker(), hoist=False)
    fast = Merger(src, INFO, zdict=plain.zdict, tracker=demo_tracker(), hoist=True)
    fast._plain = fast._fast
    for i, fields in enumerate(PEOPLE * 2, 1):
        new_plain: list[tuple[int, str]] = []
        new_fast: list[tuple[int, str]] = []
        assert (outcome(fast, i, fields, message_id=i, new_links=new_fast)
                == outcome(plain, i, fields, message_id=i, new_links=new_plain))
        assert new_fast == new_plain
    assert fast.tracker is not None and fast.tracker.fast_renders >= len(PEOPLE)


# Templates of tests/unit/test_merge.py, test_render_limits.py and test_tracking_shapes.py,
# and the cases hoisting must leave alone or get right.
CORPUS = [
    "<p>{{ first_name }} {{ city }} {{ email }} {{ list.name }} {{ list.from_address }}"
    " {{ list.from }} {{ newsletter.id }} [{{ newsletter.subject }}]"
    " <a href='{{ unsubscribe_url }}'>u</a></p>",
    "{{ unsubscribe_url }} {{ email }}",
    "{% set articles = range(1, 11) %}<ul>{% for a in articles %}"
    "<li>Article {{ a }} for {{ name }}</li>{% endfor %}</ul>",
    "{% set ns = namespace(total=0) %}{% for a in range(1, 11) %}"
    "{% set ns.total = ns.total + a %}{% endfor %}sum={{ ns.total }}",
    "<p>{{ x }}</p>",
    "x" * 500 + " = . \t\n.\nFrom me\r\nend  ",
    "{{ ''.__class__.__mro__ }}", "{{ 'x' * 100000000 }}", "{{ 10 ** 100000000 }}",
    "{{ lipsum() }}", "{{ '{0.__class__}'.format(list) }}", "{{ newsletter.update({'id': 1}) }}",
    "{{ newsletter.clear() }}", "<p>\n{{ frist_name }}</p>",
    "{% if nick is defined %}{{ nick }}{% else %}none{% endif %}{{ nick|default('friend') }}",
    "{{ 1 // n|int }}", "{{ 1 // 0 }}{{ name }}", "{% set x = list %}{{ x.name }}{{ name }}",
    "{% for i in range(10) %}<p>Artikel {{ i }}: blåbærgrød for {{ name }}</p>\n{% endfor %}",
    "{{ 'x'|center(w|int) }}", "{{ ('%' ~ w ~ 's')|format(1) }}", "{{ 'x'.ljust(w|int) }}",
    "{% set s = 'x' * 1000000 %}{% for i in [1, 2, 3, 4, 5, 6] %}{{ s }}{% endfor %}{{ name }}",
    "{% for i in [1, 2, 3] %}{{ ('x' * 1000)|replace('', 'y' * 5000) }}{% endfor %}",
    "{{ c }}{% set c = '<b>' %}{{ c }}{{ name }}",
    "{% set c = name %}{% for i in ['a'] %}{{ c }}{% endfor %}",
    "{% macro m(x) %}<a href='https://ex.com/m/{{ x }}'>{{ x }}</a>{% endmacro %}"
    "{% for a in ['1', '2'] %}{{ m(a) }}{{ name }}{% endfor %}",
    "{% autoescape false %}{{ name }}{{ list.name }}{% endautoescape %}{{ list.name }}",
    "{%- for a in ['x', 'y'] -%}\n  {{ a }} {{ name }}\n{%- endfor %}\n",
    "{% set list = 'mine' %}{{ list }}{{ name }}", "{{ newsletter }}", "{{ list }}{{ name }}",
    "{% if name %}{% set y = 1 %}{% endif %}{{ y|default('no') }}",
    "{% for a in ['x'] %}{% set y = a %}{{ y }}{{ name }}{% endfor %}{{ y|default('-') }}",
    "{% for a in [] %}x{% else %}{{ name }} empty{% endfor %}",
    "{% for a in ['a', 'b'] if a != 'a' %}{{ a }}{{ loop.length }}{{ name }}{% endfor %}",
    "{% for a in [[1, 2], [3]] %}{% for b in a %}{{ b }}{{ loop.index }}{{ name }}{% endfor %}"
    "{{ loop.index }}{% endfor %}",
    "{% for k, v in {'a': '<1>', 'b': 2}|dictsort %}{{ k }}={{ v }};{{ name }}{% endfor %}",
    "{% set c = cycler('odd', 'even') %}{% for a in [1, 2, 3] %}{{ c.next() }}{{ name }}"
    "{% endfor %}",
    "{% for a in ['x'] %}{{ loop }}{{ name }}{% endfor %}",
    "{% for a in ['x'] %}{{ 'a'.upper }}{{ name }}{% endfor %}",
    "{% block b %}{{ name }} {{ list.name }}{% endblock %}{% for a in [1] %}{{ a }}{% endfor %}",
    "{% filter upper %}{{ name }} {{ list.name }}{% endfilter %}",
    "{% set t %}{{ list.name }}{% endset %}{% for a in ['1'] %}{{ t }}{{ name }}{% endfor %}",
    "{% for range in [1, 2] %}{{ range }}{% endfor %}{{ range(2)|list }}",
    "{% if list.name %}<b>{{ name }}</b>{% elif name %}n{% else %}e{% endif %}",
    "{% for a in [1, 2] %}{% if name %}{{ a }}{% endif %}{% endfor %}",
    "{% for a in [1, 2] %}{% if name == 'Bo' %}yes{% endif %}{{ a }}{% endfor %}",
    "{% for a in [1, 2] %}{% for b in name|list %}{{ b }}{% endfor %}-{{ a }}{% endfor %}",
    "{% for a in ['<', '&'] %}{{ a ~ name }}{% endfor %}",
    "{{ newsletter['id'] }}{{ newsletter.id * 2 }}{{ list['from_name']|upper }}{{ name }}",
    "\ue000 {{ name }} \ue001 {{ list.name }}",
    "{% for i in range(3) %}{{ i }}{% endfor %}{{ name }}{{ list.name }}",
    "{{ dict(a=1) }}{{ list.name }}{{ name }}",
]
FIELDS = [{"name": "Bo <&>", "n": "0", "w": "999999999", "x": "<script>", "first_name": "Å",
           "city": "A&B", "nick": "<n>"},
          {"name": "", "n": "2", "w": "5", "x": "", "first_name": "", "city": ""},
          {}, {"name": "Bo", "range": "r", "list": "l", "newsletter": "n", "loop": "o"}]


@pytest.mark.parametrize("html", CORPUS)
def test_the_corpus_renders_the_same(html: str) -> None:
    assert_same(TemplateSource("s {{ name|default('') }}", html, html), FIELDS)


def test_what_is_not_hoisted() -> None:
    def hoisted(html: str) -> bool:
        merger = Merger(TemplateSource("s", html, None), INFO)
        return "html" in merger.hoisted

    assert hoisted("{% set a = ['<x>'] %}{% for x in a %}{{ x }}{{ v }}{% endfor %}")
    assert not hoisted("{{ v }}")                                  # nothing constant
    assert not hoisted("{{ 1 // 0 }}{{ v }}")                      # the constant part fails
    assert not hoisted("{{ list.name }}{{ undefined_name }}x" + "{{ 'x' * 6000000 }}")
    assert not hoisted("{{ list.name.upper }}{{ v }}")             # an object's address
    assert not hoisted("{% for i in [1] %}{{ v ~ i }}{% endfor %}")  # the unit reads i
    assert not hoisted("{% for i in range(3) %}{{ i }}{% endfor %}")  # range: maybe a column


def test_hoisting_is_on_by_default() -> None:
    assert SortingConfig().hoist_constants is True


_TEXT = st.sampled_from(["", "Hi ", "<p>", "</p>\n", " & ", "\n", "  \n ", "a<b>&c'\"",
                         '<a href="https://ex.com/x">', "æøå ", "\t"])
_CONST = st.sampled_from([
    "'<&>'", "c", "list.name", "list['from']", "newsletter.id", "newsletter['id'] * 2",
    "list.name|upper", "c ~ '&' ~ newsletter.id", "items|length", "'yes' if c else 'no'",
    "c|e", "'%s!'|format(c)", "c|safe", "items|join(', ')", "'<i>'|safe ~ c", "'x'.upper()",
    "items[0]", "(items|first) ~ (items|last)",
])
_DYN = st.sampled_from([
    "v", "v|upper", "email", "newsletter.subject", "subscriber['v']", "w|default('d')",
    "v ~ c", "unsubscribe_url", "v|length", "w", "newsletter", "subscriber.w is defined",
])
_LOOPY = st.sampled_from(["x", "loop.index", "x ~ v", "loop.cycle('a', '<b>')", "x|e",
                          "'<' ~ x", "loop.last"])
# In a loop: what reads the loop and the recipient (the loop cannot be unrolled).
_MIXED = st.sampled_from(["x ~ v", "v if x else ''", "loop.index ~ w|default('')",
                          "{% set c = x %}", "{% if v %}{{ x }}{% endif %}"])
_TESTS = st.sampled_from(["c", "items|length > 2", "newsletter.id == 42", "list.name", "v",
                          "w is defined", "v == 'Bo'", "not c"])
_LOOP_TESTS = st.sampled_from(["x == 3", "loop.first", "x is string"])
_ITERS = st.sampled_from(["items", "[1, '<2>']", "list.name|list", "[]", "v|list",
                          "items|reverse"])
_DASH = st.sampled_from(["", "-"])


def _out(expr: str) -> str:
    return "{{ " + expr + " }}"


def _body(depth: int, in_loop: bool) -> st.SearchStrategy[str]:
    leaves = [_TEXT, _CONST.map(_out), _DYN.map(_out), st.just("{% set c = v %}")]
    if in_loop:
        leaves += [_LOOPY.map(_out),
                   _MIXED.map(lambda m: m if m.startswith("{%") else _out(m))]
    options = [st.one_of(*leaves)]
    if depth < 2:
        inner = _body(depth + 1, in_loop)
        tests = st.one_of(_TESTS, _LOOP_TESTS) if in_loop else _TESTS
        options.append(st.builds(
            lambda t, a, b, d: f"{{%{d} if {t} {d}%}}{a}{{% else {d}%}}{b}{{%{d} endif %}}",
            tests, inner, inner, _DASH))
        options.append(st.builds(
            lambda it, a, d: f"{{% for x in {it} {d}%}}{a}{{%{d} endfor %}}",
            _ITERS, _body(depth + 1, True), _DASH))
    return st.lists(st.one_of(*options), max_size=5).map("".join)


PREAMBLE = "{% set c = '<b>&amp;' %}{% set items = ['<a>', 'b&', 3] %}"
_RECIPIENT = st.fixed_dictionaries(
    {"v": st.sampled_from(["Bo", "<&>\"'", "", "Åse"])},
    optional={"w": st.sampled_from(["x", "<w>", ""])})


@settings(max_examples=60, deadline=None)
@given(_body(0, False), st.lists(_RECIPIENT, min_size=1, max_size=3))
def test_generated_templates_render_the_same(body: str, recipients: list[dict[str, str]]
                                             ) -> None:
    template = PREAMBLE + body
    assert_same(TemplateSource("S {{ v }} {{ list.name }}", template, template), recipients)


# --- the quoted-printable of the literal text, encoded once (mime.encode_qp_pieces) ---

_QP_PIECE = st.lists(st.sampled_from(["a", " ", "\t", ".", "=", "æ", "\n", "\r", "x" * 40,
                                      "<p>", "\n.\n", " \n", "\u2028", "\x00"]),
                     max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_QP_PIECE, max_size=8), st.lists(_QP_PIECE, max_size=4))
def test_encoding_pieces_equals_encoding_the_whole(pieces: list[str], literals: list[str]
                                                   ) -> None:
    table = mime.qp_table([*literals, *pieces[::2]])
    assert mime.encode_qp_pieces(pieces, table) == mime.encode_qp("".join(pieces))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_QP_PIECE, max_size=6), min_size=1, max_size=4),
       st.integers(min_value=0, max_value=8), st.integers(min_value=0, max_value=60))
def test_encoding_with_learned_pieces_equals_encoding_the_whole(
        messages: list[list[str]], min_chars: int, budget: int) -> None:
    """Tracked HTML: pieces learned from earlier messages (merge.py) change no byte."""
    table: mime.QpTable = {}
    for pieces in messages:
        left = mime.qp_learn(table, pieces, min_chars=min_chars, budget=budget)
        assert 0 <= left <= budget
        budget = left
        assert mime.encode_qp_pieces(pieces, table) == mime.encode_qp("".join(pieces))


# --- tracked lines learned with a mark where the token goes (mime.MarkedRuns) ---

_B64URL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL = st.text(alphabet=_B64URL_CHARS, min_size=4, max_size=24)
_RUN_TEXT = st.lists(st.sampled_from(["a", " ", "\t", ".", "=", "æ", "x" * 37, "<a href=\"",
                                      "\n", "\n.\n", " \n", "\x00", "-_", "=\n"]),
                     max_size=10).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_RUN_TEXT, min_size=1, max_size=5), _B64URL, st.data())
def test_a_learned_run_gives_each_tokens_own_encoding(texts: list[str], mark: str,
                                                     data: st.DataObject) -> None:
    """The run encoded once with the mark, each later token put where the mark stood,
    equals that token's run encoded by b2a_qp: soft breaks inside a mark included."""
    run = mark.join(texts)
    if not run.endswith("\n"):
        run += "\n"
    same_length = st.text(alphabet=_B64URL_CHARS, min_size=len(mark), max_size=len(mark))
    tokens = data.draw(st.lists(same_length, min_size=1, max_size=4))
    runs = mime.MarkedRuns(100)
    for n, token in enumerate(tokens):
        runs.begin(mark, token, learn=n == 0)
        assert runs(run) == mime.encode_qp(run.replace(mark, token)).replace(b"\r\n", b"\n")


def test_a_learned_run_with_a_mark_cut_by_soft_breaks() -> None:
    mark, token = "M" * 20, "Ab-_9" * 4
    runs = mime.MarkedRuns(10)
    for width in range(50, 80):  # every place a soft break can fall in the mark
        run = "x" * width + f'<a href="https://t.example/c/{mark}AAAA">{mark}</a>\n'
        runs.begin(mark, "Q" * 20, learn=True)
        runs(run)
        runs.begin(mark, token, learn=False)
        assert runs(run) == mime.encode_qp(run.replace(mark, token)).replace(b"\r\n", b"\n")
    with pytest.raises(ValueError, match="differ in length"):
        runs.begin(mark, "short", learn=False)


def test_tracked_messages_are_the_same_hoisted_or_not_across_token_lengths() -> None:
    """Recipients whose fields move every soft break, message ids whose tokens change
    length (a new mark): the hoisted, planned, learned path gives the plain one's bytes."""
    demo = sample_newsletter()
    src = TemplateSource(demo.subject, demo.html, demo.text)
    plain = Merger(src, INFO, tracker=demo_tracker(), hoist=False)
    fast = Merger(src, INFO, zdict=plain.zdict, tracker=demo_tracker(), hoist=True)
    lengths = set()
    for n, mid in enumerate([1, 2, 3, 127, 128, 129, 2**14, 2**21 - 1, 2**21, 2**28 + 5, 4, 5]):
        fields = {"first_name": "Å" * (n % 7), "last_name": "x" * (3 * n), "city": "Ærø",
                  "member_since": str(n), "plan": "Plus" if n % 2 else ""}
        new_plain: list[tuple[int, str]] = []
        new_fast: list[tuple[int, str]] = []
        assert (outcome(fast, n, fields, message_id=mid, new_links=new_fast)
                == outcome(plain, n, fields, message_id=mid, new_links=new_plain))
        assert new_fast == new_plain
        assert fast.tracker is not None
        lengths.add(len(fast.tracker.token(mid)))
    assert len(lengths) >= 3


def test_a_tracked_newsletters_dictionary_holds_its_rewritten_links() -> None:
    demo = sample_newsletter()
    src = TemplateSource(demo.subject, demo.html, demo.text)
    rewriter = demo_tracker()
    signer = rewriter.signer
    tracked = Merger(src, INFO, tracker=rewriter)
    untracked = Merger(src, INFO)
    assert b"https://t.example.com/c/" in tracked.zdict
    assert b"https://t.example.com/c/" not in untracked.zdict
    # Building the dictionary taught the newsletter's rewriter nothing: the first
    # message still reports every link as new (the sort worker stores them from that).
    assert rewriter.known == {}
    fields = {"first_name": "Søren", "last_name": "Ø", "city": "Aarhus", "member_since": "1999",
              "plan": "Plus"}
    new: list[tuple[int, str]] = []
    raw = tracked.render("r@example.com", fields, UNSUB, message_id=77, new_links=new)
    assert len(new) == len(rewriter.known) > 5
    blob = tracked.compress(raw)
    assert decompress(blob, tracked.zdict) == raw
    assert len(blob) < len(Merger(src, INFO, zdict=untracked.zdict, tracker=Rewriter(
        signer, 42, "https://t.example.com/c/", "https://t.example.com/o/", ())).compress(raw))
