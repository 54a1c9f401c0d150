"""The mail merge: customer templates rendered safely, one message per recipient.

Pure (no database, no SMTP). The sort worker builds one :class:`Merger` per
newsletter and calls :meth:`Merger.render` per recipient; the result is stored
compressed with a per-newsletter preset dictionary.

Template decisions (README material):

- Templates are customer input, so they render in Jinja2's
  ``ImmutableSandboxedEnvironment``: no ``_``-attributes, no internals, and no
  mutating of the shared objects (``list``, ``newsletter``) that one
  recipient's render could leak into the next. There is no loader:
  ``{% include %}``, ``{% extends %}`` and ``{% import %}`` are refused when
  the template is added, and would fail at render time anyway. ``lipsum`` is
  removed (it is random, and the compression dictionary must be
  deterministic). ``*`` and ``**`` are capped so ``{{ 'x' * 10**10 }}`` fails
  instead of eating the worker's memory.
- HTML is autoescaped; the text part and the subject are not (they are not
  HTML). The subject is rendered first, its CR/LF/control characters are
  collapsed to spaces, and that value is ``newsletter.subject`` in the bodies.
- Undefined variables are an error (``StrictUndefined``): a typo such as
  ``{{ frist_name }}`` fails that message with the reason, rather than
  mailing "Dear ," to a whole list. Optional data is written
  ``{{ nickname | default('friend') }}`` or ``{% if nickname is defined %}``.
  :func:`template_variables` lists the names a template needs so the enqueue
  step can refuse a list that lacks one before anything is sent.
- Variables: every CSV field by column name, ``email``, ``unsubscribe_url``,
  ``list`` (``name``, ``from``, ``from_address``, ``from_name``),
  ``newsletter`` (``id``, ``subject``) and ``subscriber`` (all fields plus
  ``email``, for columns whose names are not identifiers:
  ``{{ subscriber['first name'] }}``). The reserved names win over CSV
  columns of the same name, so a column cannot replace the signed
  unsubscribe link.
- Jinja's default whitespace handling is kept (no trim_blocks), so
  templates behave as Jinja users expect.
- What a template prints the same for every recipient is rendered once per
  newsletter (hoisting.py, ``[sorting] hoist_constants``, on by default):
  static HTML, loops over the template's own ``{% set %}`` data, ``list.*``
  and ``newsletter.id`` become literal text, and only the recipient's
  expressions run per message, with byte-identical output (4x less render
  CPU on the demo newsletter). The literal text's quoted-printable is
  encoded once as well (mime.encode_qp_pieces). A hoisted render that fails
  with a template error is rendered again as written, so a message's reason
  is the plain render's.

Hostile templates (README "Hostile input"). Three layers, cheapest first:

1. ``template add`` refuses what it can already see in the syntax tree
   (:func:`check_template`): a literal width over :data:`MAX_WIDTH` in a
   filter, a str method, a ``%`` or ``.format()`` spec; a literal repetition
   over :data:`MAX_REPEAT`; nested ``for`` loops over literal ranges that
   run more than :data:`MAX_LOOP_ITERATIONS` times.
2. In the sandbox, the operations that build big strings from small inputs
   are capped with a reason naming the part and line: widths/precisions
   (``center``, ``indent``, ``wordwrap``, ``tojson`` indent, the ``format``
   filter and ``%``, ``str.format``/``format_map`` specs, ``ljust``/
   ``rjust``/``center``/``zfill``/``expandtabs``), result sizes (``*``,
   ``**``, ``replace``, ``join``, ``batch``/``slice`` fill), and each part's
   output is counted while it streams (``generate()``) and stops at
   :data:`MAX_PART_CHARS`. Jinja folds constant filter calls at compile
   time, so the caps also keep ``template add`` itself small.
3. What no cap can see (a loop that never ends, a concatenation that
   doubles, big-integer arithmetic in C) is stopped by the render child
   (``render_child.py``): CPU-time and address-space limits per render and a
   wall-clock watchdog. :class:`RenderTimeout` is what its CPU alarm raises;
   it is a BaseException so no ``except Exception`` in Jinja or a filter can
   swallow it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import re
import string
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from email.utils import parseaddr
from itertools import islice
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, cast

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS
from jinja2.sandbox import (
    MAX_RANGE,
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from markupsafe import Markup

from sendsystem import hoisting, mime
from sendsystem.errors import TemplateError

if TYPE_CHECKING:
    from sendsystem.tracking.links import Rewriter

log = logging.getLogger(__name__)

PARTS = ("subject", "html", "text")
# Rendered output bigger than this is a runaway loop, not a newsletter.
MAX_PART_CHARS = 5_000_000
# Results of `*` on sequences, `replace`, `join` ... are capped (module docstring).
MAX_REPEAT = 1_000_000
_MAX_EXPONENT = 1_000
# `**` and `*` on integers: no result over this many bits (10**30000 is ~100,000).
_MAX_POW_BITS = 100_000
# A width or precision in a format spec, or a padding width: more is a bomb,
# not a layout (a newsletter line is ~80 characters).
MAX_WIDTH = 10_000
# `template add` refuses nested loops over literal ranges that run more often.
MAX_LOOP_ITERATIONS = 10_000_000
_ZLIB_WINDOW = 32 * 1024
# Level 3 / memLevel 8: with each newsletter's own dictionary (compression_dictionary),
# the demo newsletter compresses in 38 us to 675 bytes at level 3 against 93 us and
# 522 bytes at level 6 (levels 4+ match lazily: twice the time); levels 1-2 are no
# faster and bigger (1,041-1,380 bytes). The merge is the pipeline's slower stage;
# 150 more stored bytes of a 20 KB message cost the database little.
_ZLIB_LEVEL = 3
_ZLIB_MEMLEVEL = 8
# Tracked HTML (Merger._encode_tracked): the text between links is learned from the
# first few messages, pieces of at least this many characters, within a budget.
_TRACKED_QP_LEARN = 3
_TRACKED_QP_MIN_CHARS = 64
_TRACKED_QP_CHARS = 4_000_000
# ... and at most this many of the lines around links (mime.MarkedRuns).
_TRACKED_RUNS = 10_000


@dataclass(frozen=True)
class TemplateSource:
    """A template as the customer wrote it.

    ``text`` None means no text version: messages are a single text/html part
    (no multipart/alternative with one member, and nothing derived).
    """

    subject: str
    html: str
    text: str | None = None


@dataclass(frozen=True)
class NewsletterInfo:
    newsletter_id: int
    list_name: str
    from_header: str  # "Name <addr@example.com>", already validated
    has_attachments: bool = False


class MergeError(Exception):
    """One recipient's message could not be rendered; the message says why.

    ``kind``: ``"render"`` (the template failed: an error or a cap),
    ``"limit"`` (a CPU, memory or output limit stopped it) or
    ``"recipient"`` (this recipient's data, e.g. the address, is unusable).
    Render and limit failures count towards a newsletter's pause.
    """

    def __init__(self, reason: str, kind: str = "render") -> None:
        super().__init__(reason)
        self.kind = kind


class RenderTimeout(BaseException):
    """A render used up its CPU time (raised by the render child's alarm)."""


def _width(what: str, width: Any) -> None:
    if isinstance(width, int) and width > MAX_WIDTH:
        raise SecurityError(f"width {width} in {what} is over the limit of {MAX_WIDTH:,}")


def _size(what: str, size: int) -> None:
    if size > MAX_REPEAT:
        raise SecurityError(f"{what} would build {size:,} characters or items, over the "
                            f"limit of {MAX_REPEAT:,}")


# %-format conversion specs: flags, width, precision, length, type.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.|$)", re.S)
# The start of a str.format spec: [[fill]align][sign][z][#][0][width][,_][.precision]
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d*))?", re.S)


def _check_number(what: str, number: str | None) -> None:
    if number == "*":
        raise SecurityError(f"a '*' width in {what} is not allowed; write the width as a "
                            f"number (at most {MAX_WIDTH:,})")
    if number and (len(number) > 9 or int(number) > MAX_WIDTH):
        raise SecurityError(f"width {number} in {what} is over the limit of {MAX_WIDTH:,}")


def check_percent_format(fmt: str, what: str = "a % format") -> None:
    """Refuse widths/precisions over MAX_WIDTH in a printf-style format."""
    if "%" not in fmt:
        return
    for m in _PERCENT_SPEC.finditer(fmt):
        _check_number(what, m.group(1))
        _check_number(what, m.group(2))


def check_format_spec(spec: str, what: str = "a format spec") -> None:
    """Refuse widths/precisions over MAX_WIDTH in one str.format spec."""
    m = _FORMAT_SPEC.match(spec)
    if m:
        _check_number(what, m.group(1))
        _check_number(what, m.group(2))


def _capped_mul(left: Any, right: Any) -> Any:
    for seq, n in ((left, right), (right, left)):
        if (
            isinstance(seq, str | bytes | list | tuple)
            and isinstance(n, int)
            and len(seq) * n > MAX_REPEAT
        ):
            raise SecurityError(f"repetition result too large (over {MAX_REPEAT} items)")
    if isinstance(left, int) and isinstance(right, int) \
            and left.bit_length() + right.bit_length() > _MAX_POW_BITS:
        # Squaring in a loop reaches multiplications that run in C for minutes.
        raise SecurityError(f"product too large (over {_MAX_POW_BITS:,} bits)")
    return operator.mul(left, right)


def _capped_pow(left: Any, right: Any) -> Any:
    if isinstance(right, int) and abs(right) > _MAX_EXPONENT:
        raise SecurityError(f"exponent too large (over {_MAX_EXPONENT})")
    if isinstance(left, int) and isinstance(right, int) and right > 0 \
            and left.bit_length() * right > _MAX_POW_BITS:
        # (10**1000)**1000 runs in C for minutes, out of reach of the CPU alarm.
        raise SecurityError(f"power result too large (over {_MAX_POW_BITS:,} bits)")
    return operator.pow(left, right)


def _capped_mod(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        check_percent_format(left, "a % format")
    return operator.mod(left, right)


def _replace_size(s: Any, old: Any, new: Any, count: Any) -> int:
    text, old, new = str(s), str(old), str(new)
    n = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(text) + n * max(len(new) - len(old), 0)


def _guarded_filter(name: str, check: Callable[..., None]) -> Callable[..., Any]:
    """Jinja's filter ``name`` with ``check`` run first on its arguments."""
    original = FILTERS[name]
    skip = 1 if hasattr(original, "jinja_pass_arg") else 0

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check(*args[skip:], **kwargs)
        return original(*args, **kwargs)

    return guarded


def _check_indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    w = width if isinstance(width, int) else len(str(width))
    _width("indent", w)
    _size("indent", len(str(s)) + (str(s).count("\n") + 1) * max(w, 0))


def _check_fill(what: str) -> Callable[..., None]:
    def check(_value: Any, n: Any, fill_with: Any = None, *_: Any, **__: Any) -> None:
        if isinstance(n, int) and (fill_with is not None or what == "slice") and n > MAX_WIDTH:
            raise SecurityError(f"{what} count {n} is over the limit of {MAX_WIDTH:,}")
    return check


def _capped_join_filter() -> Callable[..., Any]:
    original = FILTERS["join"]

    @functools.wraps(original)
    def join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
        items = value if isinstance(value, list | tuple) else list(value)
        _size("join", len(str(d)) * max(len(items) - 1, 0))
        return original(eval_ctx, items, d, attribute)

    return join


_CAPPED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _guarded_filter("center", lambda _v, width=80, *a, **k: _width("center", width)),
    "indent": _guarded_filter("indent", _check_indent),
    "wordwrap": _guarded_filter("wordwrap",
                                lambda _s, width=79, *a, **k: _width("wordwrap", width)),
    "format": _guarded_filter("format", lambda value, *a, **k: check_percent_format(
        str(value), "the format filter")),
    "replace": _guarded_filter("replace", lambda s, old, new, count=None, *a, **k: _size(
        "replace", _replace_size(s, old, new, count))),
    "tojson": _guarded_filter("tojson", lambda _v, indent=None, *a, **k: _width(
        "tojson indent", indent)),
    "batch": _guarded_filter("batch", _check_fill("batch")),
    "slice": _guarded_filter("slice", _check_fill("slice")),
    "join": _capped_join_filter(),
}


def _str_join_check(owner: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not args:
        return args
    items = args[0] if isinstance(args[0], list | tuple) else list(args[0])
    _size("str.join()", len(owner) * max(len(items) - 1, 0))
    return (items, *args[1:])


def _str_call_check(owner: str, name: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Checks for the str methods that can build big strings; may return new args."""
    if name in ("ljust", "rjust", "center", "zfill"):
        _width(f"str.{name}()", args[0] if args else kwargs.get("width"))
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        _width("str.expandtabs()", tab)
        if isinstance(tab, int):
            _size("str.expandtabs()", len(owner) + owner.count("\t") * tab)
    elif name == "replace" and len(args) >= 2:
        _size("str.replace()", _replace_size(owner, args[0], args[1],
                                             args[2] if len(args) > 2 else kwargs.get("count")))
    elif name == "join":
        return _str_join_check(owner, args)
    return args


class _SpecCheck(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        check_format_spec(format_spec, "a format field")
        return super().format_field(value, format_spec)


class _CappedFormatter(_SpecCheck, SandboxedFormatter):
    pass


class _CappedEscapeFormatter(_SpecCheck, SandboxedEscapeFormatter):
    pass


class _RefusingLoader(jinja2.BaseLoader):
    """Templates cannot load other templates or files, ever."""

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        raise jinja2.TemplateNotFound(
            f"{template} (templates cannot include, import or extend other files)"
        )


# Attribute names of the mapping types templates see; a dict key that is not
# one of these is resolved by Jinja to the item anyway (see getattr below).
_MAPPING_ATTRS: dict[type, frozenset[str]] = {
    dict: frozenset(dir(dict)), MappingProxyType: frozenset(dir(MappingProxyType))}


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        """``a.url`` on a plain dict without the failed getattr() round trip.

        Same result as the sandbox's own lookup: Jinja prefers a real
        attribute, so only names that are not attributes of the type take the
        fast path, and an item is returned unchanged there too.
        """
        attrs = _MAPPING_ATTRS.get(type(obj))
        if attrs is not None and attribute not in attrs:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)

    def __init__(self, undefined: type[jinja2.Undefined]) -> None:
        super().__init__(
            autoescape=lambda name: name == "html",
            undefined=undefined,
            loader=_RefusingLoader(),
            auto_reload=False,
            cache_size=0,
        )
        self.globals.pop("lipsum", None)
        self.binop_table["*"] = _capped_mul
        self.binop_table["**"] = _capped_pow
        self.binop_table["%"] = _capped_mod
        self.filters.update(_CAPPED_FILTERS)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any,
             *args: Any, **kwargs: Any) -> Any:
        """Every call in a template; str methods that can build big strings are checked."""
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _str_call_check(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """The sandbox's ``str.format`` wrapper, with width/precision caps per field."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        f_self: str = value.__self__
        is_format_map = value.__name__ == "format_map"
        formatter: SandboxedFormatter = (
            _CappedEscapeFormatter(self, escape=f_self.escape)
            if isinstance(f_self, Markup) else _CappedFormatter(self))

        def capped(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    return wrapped(*args, **kwargs)  # the sandbox's own TypeError
                kwargs, args = args[0], ()
            return type(f_self)(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(capped, value)


def _sources(src: TemplateSource) -> Iterator[tuple[str, str]]:
    yield "subject", src.subject
    yield "html", src.html
    if src.text is not None:
        yield "text", src.text


def _refuse_unsafe_nodes(part: str, ast: nodes.Template) -> None:
    """Refuse at add time what could only fail (or be abused) at send time."""
    for node in ast.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
        keyword = {
            nodes.Include: "include",
            nodes.Extends: "extends",
            nodes.Import: "import",
            nodes.FromImport: "from ... import",
        }[type(node)]
        raise TemplateError(
            f"{part} template, line {node.lineno}: {{% {keyword} %}} is not allowed; "
            "a template must be self-contained (paste the shared part in)"
        )
    for getattr_node in ast.find_all(nodes.Getattr):
        if getattr_node.attr.startswith("_"):
            raise TemplateError(
                f"{part} template, line {getattr_node.lineno}: attribute "
                f"{getattr_node.attr!r} is not "
                "allowed (names starting with '_' are private)"
            )


def _compile(env: _Environment, part: str, source: str) -> jinja2.Template:
    try:
        ast = env.parse(source, name=part)
        _refuse_unsafe_nodes(part, ast)
        code = env.compile(source, name=part, filename=f"<{part} template>")
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{part} template, line {exc.lineno}: {exc.message}") from None
    return env.template_class.from_code(env, code, env.make_globals(None), None)


def _const(node: nodes.Node) -> Any:
    """The value of a literal expression (constants, +, *, ** of them), else None.

    Jinja itself does not fold the sandbox's intercepted operators, so
    ``'x' * 10**7`` is worked out here, with the same caps.
    """
    if isinstance(node, nodes.Const):
        return node.value
    if isinstance(node, nodes.List | nodes.Tuple):
        items = [_const(i) for i in node.items]
        return None if any(i is None for i in items) else items
    if isinstance(node, nodes.Neg):
        value = _const(node.node)
        return -value if isinstance(value, int) else None
    if isinstance(node, nodes.Mul | nodes.Pow | nodes.Add):
        left, right = _const(node.left), _const(node.right)
        if left is None or right is None:
            return None
        op = {nodes.Mul: _capped_mul, nodes.Pow: _capped_pow, nodes.Add: operator.add}
        try:
            return op[type(node)](left, right)
        except SecurityError as exc:
            raise _Refused(node, exc.message or str(exc)) from None
        except Exception:
            return None
    return None


class _Refused(Exception):
    def __init__(self, node: nodes.Node, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


_WIDTH_FILTERS = {"center": ("width", 0), "indent": ("width", 0), "wordwrap": ("width", 0),
                  "tojson": ("indent", 0)}
_FILL_FILTERS = {"batch": ("linecount", 0), "slice": ("slices", 0)}
_WIDTH_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}


def _arg(node: nodes.Filter | nodes.Call, name: str, index: int) -> Any:
    for kw in node.kwargs:
        if kw.key == name:
            return _const(kw.value)
    return _const(node.args[index]) if len(node.args) > index else None


def _check_node(node: nodes.Node) -> None:
    """Raise _Refused for a literal that would trip a render-time cap."""
    try:
        if isinstance(node, nodes.Filter):
            if node.name in _WIDTH_FILTERS:
                _width(f"the {node.name} filter", _arg(node, *_WIDTH_FILTERS[node.name]))
            elif node.name in _FILL_FILTERS:
                n = _arg(node, *_FILL_FILTERS[node.name])
                if isinstance(n, int) and n > MAX_WIDTH:
                    raise SecurityError(f"{node.name} count {n} is over the limit of "
                                        f"{MAX_WIDTH:,}")
            elif node.name == "format" and node.node is not None:
                fmt = _const(node.node)
                if isinstance(fmt, str):
                    check_percent_format(fmt, "the format filter")
        elif isinstance(node, nodes.Mod):
            fmt = _const(node.left)
            if isinstance(fmt, str):
                check_percent_format(fmt, "a % format")
        elif isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
            attr = node.node.attr
            if attr in _WIDTH_METHODS:
                _width(f"str.{attr}()", _arg(node, "width" if attr != "expandtabs"
                                             else "tabsize", 0))
            elif attr in ("format", "format_map"):
                fmt = _const(node.node.node)
                if isinstance(fmt, str):
                    for _, field, spec, _ in string.Formatter().parse(fmt):
                        if field is not None and spec:
                            check_format_spec(spec, "a format field")
        elif isinstance(node, nodes.Mul | nodes.Pow):
            _const(node)
    except SecurityError as exc:
        raise _Refused(node, exc.message or str(exc)) from None


def _range_length(node: nodes.Node) -> int | None:
    """Iterations of ``for x in range(<literals>)`` or a literal list, else None."""
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name) \
            and node.node.name == "range" and not node.kwargs and node.args:
        args = [_const(a) for a in node.args]
        if all(isinstance(a, int) for a in args) and len(args) <= 3:
            try:
                return len(range(*args))
            except ValueError:
                return None
    value = _const(node)
    return len(value) if isinstance(value, list) else None


def _check_loops(node: nodes.Node, runs: int) -> None:
    """Refuse nested loops over literal ranges that multiply past MAX_LOOP_ITERATIONS.

    ``runs``: how often the enclosing loops run ``node`` (literal ranges
    multiply; a loop over data counts once, as nothing is known of it).
    """
    if not isinstance(node, nodes.For):
        _check_node(node)
        for child in node.iter_child_nodes():
            _check_loops(child, runs)
        return
    n = _range_length(node.iter)
    if n is not None and n > MAX_RANGE:
        raise _Refused(node, f"range of {n:,} items is over the sandbox's limit of {MAX_RANGE:,}")
    inner = runs * (n if n is not None else 1)
    if inner > MAX_LOOP_ITERATIONS:
        raise _Refused(node, f"nested loops would run {inner:,} times, over the limit of "
                             f"{MAX_LOOP_ITERATIONS:,}")
    for body in node.body:
        _check_loops(body, inner)
    for other in (node.target, node.iter, node.test, *node.else_):
        if other is not None:
            _check_loops(other, runs)


def _refuse_oversized(part: str, ast: nodes.Template) -> None:
    """Refuse at add time what the render-time caps would refuse for every recipient."""
    try:
        _check_loops(ast, 1)
    except _Refused as exc:
        raise TemplateError(
            f"{part} template, line {exc.node.lineno}: {exc.reason}; templates are limited "
            "so one newsletter cannot stall the others (see README, Hostile input)"
        ) from None


def check_template(src: TemplateSource) -> None:
    """Compile every part in the sandbox; TemplateError names the part and line.

    Also refuses what the syntax tree already shows to be too big (literal
    widths, repetitions and nested literal loops over the limits).
    """
    env = _Environment(jinja2.StrictUndefined)
    for part, source in _sources(src):
        try:
            _refuse_oversized(part, env.parse(source, name=part))
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{part} template, line {exc.lineno}: {exc.message}") from None
        _compile(env, part, source)


def template_variables(src: TemplateSource) -> frozenset[str]:
    """Top-level names the template reads without defining them itself.

    Includes names guarded by ``default``/``is defined`` (Jinja cannot tell),
    so treat a missing one as a warning unless it is used unguarded.
    """
    env = _Environment(jinja2.StrictUndefined)
    names: set[str] = set()
    for part, source in _sources(src):
        try:
            names |= meta.find_undeclared_variables(env.parse(source, name=part))
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{part} template, line {exc.lineno}: {exc.message}") from None
    return frozenset(names - set(env.globals))


def _generated_line(template: jinja2.Template, part: str,
                    tb: TracebackType | None) -> int | None:
    """The template line of an exception, from the generated code's line table."""
    line = None
    filename = f"<{part} template>"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = template.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return line


def _suspended_line(gen: Any, template: jinja2.Template, part: str) -> int | None:
    """The template line a streaming render is paused at (for the output cap)."""
    line = None
    filename = f"<{part} template>"
    while gen is not None:
        frame = getattr(gen, "gi_frame", None)
        if frame is not None and frame.f_code.co_filename == filename:
            line = template.get_corresponding_lineno(frame.f_lineno)
        gen = getattr(gen, "gi_yieldfrom", None)
    return line


def _where(part: str, line: int | None) -> str:
    return f"{part} template, line {line}" if line else f"{part} template"


# Output is counted per block of this many pieces (one piece per template
# expression or text run): a per-piece Python loop cost ~10 % of the render.
_BLOCK = 256


def _render(template: jinja2.Template, part: str, context: dict[str, Any]) -> str:
    """One part, streamed so the output cap stops a runaway loop as it happens."""
    return "".join(_render_pieces(template, part, context))


def _render_pieces(template: jinja2.Template, part: str, context: dict[str, Any]) -> list[str]:
    """One part as the template's output pieces (literal text and values, in order).

    Runs the compiled template's generator directly (what ``render()`` and
    ``generate()`` wrap), so no exception is rewritten: the template line
    comes from the generated code's line table, the same for every error.
    Tracking wants the pieces (sendsystem/tracking/links.py: a known shape
    skips the link scan); everything else joins them (:func:`_render`).
    """
    out: list[str] = []
    size = 0
    # Jinja types it an Iterator; it is the compiled template's generator.
    gen = cast(Generator[str, None, None],
               template.root_render_func(template.new_context(context)))
    try:
        while True:
            block = list(islice(gen, _BLOCK))
            if not block:
                break
            size += sum(map(len, block))
            if size > MAX_PART_CHARS:
                line = _suspended_line(gen, template, part)
                raise MergeError(f"{_where(part, line)}: output over {MAX_PART_CHARS:,} "
                                 "characters", "limit")
            out += block
    except MergeError:
        raise
    except RenderTimeout as exc:
        line = _generated_line(template, part, exc.__traceback__)
        raise MergeError(f"{_where(part, line)}: {exc}", "limit") from None
    except MemoryError as exc:
        line = _generated_line(template, part, exc.__traceback__)
        raise MergeError(f"{_where(part, line)}: ran out of memory (over the render "
                         "memory limit)", "limit") from None
    except Exception as exc:
        # Anything a customer template can raise (undefined name, sandbox
        # violation, a filter's TypeError, ZeroDivisionError ...) fails this
        # recipient only.
        line = _generated_line(template, part, exc.__traceback__)
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise MergeError(f"{_where(part, line)}: {reason}") from None
    finally:
        gen.close()
    return out


def _list_object(info: NewsletterInfo) -> Mapping[str, Any]:
    name, address = parseaddr(info.from_header)
    return MappingProxyType(
        {
            "name": info.list_name,
            "from": info.from_header,
            "from_address": address,
            "from_name": name,
        }
    )


def _check_address(email: str) -> bytes:
    if not email.isascii() or "@" not in email:
        raise MergeError(
            f"recipient address {email!r} is not a plain ASCII address "
            "(internationalised addresses are not supported; use the punycode domain)",
            "recipient",
        )
    if any(c <= " " or c == "\x7f" or c in '<>,;"()' for c in email):
        raise MergeError(f"recipient address {email!r} contains a space, control or special char",
                         "recipient")
    return email.encode("ascii")


Limit = Callable[[], AbstractContextManager[object]]


def compression_dictionary(src: TemplateSource, limit: Limit = contextlib.nullcontext,
                           rewrite: Callable[[str], str] | None = None,
                           info: NewsletterInfo | None = None) -> bytes:
    """The zlib preset dictionary for messages of this template.

    Each part is rendered with every merge field empty and encoded exactly like
    a real message, in message order, after the constant MIME lines, so that a
    recipient's message is mostly back references into it. A part that cannot
    render that way contributes its raw source instead. Decompressing with a
    different dictionary fails loudly (zlib checks the dictionary's Adler-32),
    never silently.

    ``info``: the newsletter's id, list and From, as its messages have them. They
    matter more than they look: a newsletter id in the links (``utm_campaign``)
    moves every soft line break of the quoted-printable after it, so a dictionary
    rendered with id 0 matched the messages badly (bench newsletter: 614 stored
    bytes in 88 µs against 402 bytes in 77 µs). Without ``info`` (id 0, no list
    name, no From) the dictionary depends on the template alone: that is how
    newsletters merged before schema version 3, which have none stored, were
    compressed (compose.newsletter_zdict derives it again for them).

    Rendering customer code: the sort worker's render child computes it once
    per newsletter with each part under ``limit`` (its CPU-time alarm) and
    stores it in ``newsletters.zdict``; a part that hits a limit also
    contributes its raw source.

    ``rewrite``: what tracking does to the rendered HTML (tracking/links.py), so that
    a tracked message's links, all new text to a dictionary of the template as
    written, are back references too (the click tokens' link parts are the same in
    every message): tracked messages then compress to ~40 % of the bytes in ~60 %
    of the time. Such a dictionary depends on the tracking key, so it is not derived
    again on the send side: it is always the stored one (sort_worker.py stores it
    before the first message is rendered).
    """
    env = _Environment(jinja2.ChainableUndefined)
    context: dict[str, Any] = {
        "list": {"name": "", "from": "", "from_address": "", "from_name": ""},
        "newsletter": {"id": 0, "subject": ""},
    }
    if info is not None:
        context = {"list": _list_object(info),
                   "newsletter": {"id": info.newsletter_id, "subject": ""}}
    rendered: dict[str, str] = {}
    for part, source in _sources(src):
        try:
            with limit():
                rendered[part] = _render(_compile(env, part, source), part, context)
                if part == "html" and rewrite is not None:
                    rendered[part] = rewrite(rendered[part])
        except (Exception, RenderTimeout):
            rendered[part] = source
    if info is None:
        skeleton = mime.build_skeleton(0, None, src.text is not None, False)
    else:
        skeleton = mime.build_skeleton(info.newsletter_id, info.from_header,
                                       src.text is not None, info.has_attachments)
    pieces = [
        skeleton.from_line + b"To: \r\n",
        mime.header_line("Subject", mime.safe_header_value(rendered["subject"])),
        skeleton.head,
    ]
    if "text" in rendered:
        pieces.append(mime.encode_qp(rendered["text"]))
        pieces.append(skeleton.mid)
    pieces.append(mime.encode_qp(rendered["html"]))
    pieces.append(skeleton.end)
    # zlib only looks back 32 KB; keep the end (the HTML, the bulk of a message).
    return b"".join(pieces)[-_ZLIB_WINDOW:]


class Compressor:
    """zlib with a preset dictionary, primed once and copied per message.

    Priming a 32 KB dictionary hashes every position of it; copying a primed
    stream is a memcpy, several times cheaper per message.
    """

    def __init__(self, zdict: bytes, level: int = _ZLIB_LEVEL) -> None:
        self._prototype = zlib.compressobj(
            level, zlib.DEFLATED, 15, _ZLIB_MEMLEVEL, zlib.Z_DEFAULT_STRATEGY, zdict
        )

    def compress(self, data: bytes) -> bytes:
        c = self._prototype.copy()
        return c.compress(data) + c.flush()


def compress(data: bytes, zdict: bytes) -> bytes:
    """One message, zlib format with ``zdict`` as preset dictionary."""
    c = zlib.compressobj(
        _ZLIB_LEVEL, zlib.DEFLATED, 15, _ZLIB_MEMLEVEL, zlib.Z_DEFAULT_STRATEGY, zdict
    )
    return c.compress(data) + c.flush()


def decompress(blob: bytes, zdict: bytes) -> bytes:
    """Inverse of :func:`compress`; zlib.error if ``zdict`` is not the one used."""
    d = zlib.decompressobj(15, zdict)
    data = d.decompress(blob) + d.flush()
    if not d.eof:
        raise zlib.error("compressed message is truncated")
    return data


class Merger:
    """Everything constant for one newsletter, prepared once; ``render`` per recipient."""

    def __init__(self, src: TemplateSource, info: NewsletterInfo, *,
                 zdict: bytes | None = None, limit: Limit = contextlib.nullcontext,
                 tracker: Rewriter | None = None, hoist: bool = True) -> None:
        """``zdict``: the stored dictionary, else it is computed (each part under ``limit``).
        ``tracker``: rewrites links and adds the open pixel (open and click tracking).
        ``hoist``: render once what is the same for every recipient (hoisting.py)."""
        self.tracker = tracker
        env = _Environment(jinja2.StrictUndefined)
        with limit():  # compiling folds constants: customer code runs here too
            self._plain = {part: _compile(env, part, source) for part, source in _sources(src)}
        self._info = info
        self._list = _list_object(info)
        # What renders a message: the hoisted template of a part, else the part as written.
        self._fast = dict(self._plain)
        self.hoisted: dict[str, hoisting.Hoisted] = {}
        # The quoted-printable of the hoisted literal text, encoded once (mime.py).
        self._qp: dict[str, mime.QpTable] = {}
        if hoist:
            constants = {"list": self._list, "newsletter": {"id": info.newsletter_id}}
            for part, source in _sources(src):
                try:
                    with limit():  # the constant render is customer code
                        done = hoisting.hoist(env, part, source, constants, _render)
                except (Exception, RenderTimeout) as exc:
                    log.debug("newsletter %s: the %s template is rendered as written (%s)",
                              info.newsletter_id, part, exc)
                    continue
                self.hoisted[part] = done
                self._fast[part] = done.template
                self._qp[part] = mime.qp_table(done.literals)
        # Tracked HTML: the hoisted literals, and the ends of those cut by a link,
        # learned from the first messages.
        self._tracked_qp: mime.QpTable = dict(self._qp.get("html", {}))
        self._tracked_budget = _TRACKED_QP_CHARS
        self._tracked_seen = 0
        self._tracked_mark = ""
        self._tracked_plans = 0
        self._marked_runs = mime.MarkedRuns(_TRACKED_RUNS)
        try:
            self._skeleton = mime.build_skeleton(
                info.newsletter_id, info.from_header, src.text is not None, info.has_attachments
            )
        except ValueError as exc:
            raise TemplateError(f"cannot build messages: {exc}") from None
        self.zdict: bytes = zdict if zdict is not None else compression_dictionary(
            src, limit, tracker.sample if tracker is not None else None, info)
        self._compressor = Compressor(self.zdict)

    def _pieces(self, part: str, context: dict[str, Any]) -> list[str]:
        """One part's output pieces; a template error of a hoisted render is the plain one's.

        Errors of kind ``limit`` are not rendered again: the CPU alarm has fired.
        """
        fast = self._fast[part]
        try:
            return _render_pieces(fast, part, context)
        except MergeError as exc:
            plain = self._plain[part]
            if fast is plain or exc.kind != "render":
                raise
            return _render_pieces(plain, part, context)

    def render(self, email: str, fields: Mapping[str, str], unsubscribe_url: str, *,
               message_id: int | None = None,
               new_links: list[tuple[int, str]] | None = None) -> bytes:
        """The stored form of one recipient's message (RFC 5322, CRLF, 7-bit).

        With a ``tracker`` and a ``message_id`` the rendered parts' links are
        rewritten (sendsystem/tracking/links.py); link table rows it made for the
        first time are appended to ``new_links``. Raises MergeError when this
        recipient's message cannot be built.
        """
        tracker = self.tracker if message_id is not None else None
        if new_links is None:
            new_links = []
        to = _check_address(email)
        context: dict[str, Any] = dict(fields)
        subscriber = dict(fields)
        subscriber["email"] = email
        newsletter: dict[str, Any] = {"id": self._info.newsletter_id}
        context["email"] = email
        context["unsubscribe_url"] = unsubscribe_url
        context["list"] = self._list
        context["newsletter"] = newsletter
        context["subscriber"] = subscriber
        subject = mime.safe_header_value("".join(self._pieces("subject", context)))
        newsletter["subject"] = subject
        pieces = self._pieces("html", context)
        if tracker is None:
            html = self._encode("html", pieces)
        else:
            token = tracker.token(cast(int, message_id))
            mark = tracker.mark(len(token))
            tracked = tracker.html_pieces(None, cast(int, message_id), new_links, pieces, mark)
            html = self._encode_tracked(tracked, token, mark)
        sk = self._skeleton
        head = (sk.from_line, b"To: ", to, b"\r\n", mime.header_line("Subject", subject), sk.head)
        if "text" not in self._plain:
            return b"".join((*head, html, sk.end))
        pieces = self._pieces("text", context)
        if tracker is not None and tracker.text_links:
            text = mime.encode_qp(tracker.text("".join(pieces), cast(int, message_id), new_links))
        else:
            text = self._encode("text", pieces)
        return b"".join((*head, text, sk.mid, html, sk.end))

    def _encode_tracked(self, pieces: list[str], token: str, mark: str) -> bytes:
        """A tracked HTML part, its token written as ``mark`` in ``pieces``.

        The rewriter keeps the hoisted literals as pieces, or for a planned render
        joins the text between merge values (tracking/links.py); that text recurs in
        every message of the shape but for the marks, so its encoding is learned once
        (bounded) and reused, with the token put in (mime.MarkedRuns). Learned from
        the first messages of each mark and from the first use of each plan: what
        recurs is in every one."""
        if "html" not in self.hoisted:
            return mime.encode_qp("".join(pieces).replace(mark, token))
        runs = self._marked_runs
        tracker = cast("Rewriter", self.tracker)
        if mark != self._tracked_mark:
            self._tracked_mark, self._tracked_seen = mark, 0
        learn = (self._tracked_seen < _TRACKED_QP_LEARN
                 or tracker.plans_made != self._tracked_plans)
        self._tracked_plans = tracker.plans_made
        self._tracked_seen += 1
        runs.begin(mark, token, learn)
        if learn and self._tracked_budget > 0:
            self._tracked_budget = runs.learn_pieces(
                self._tracked_qp, pieces, min_chars=_TRACKED_QP_MIN_CHARS,
                budget=self._tracked_budget)
        return mime.encode_qp_pieces(pieces, self._tracked_qp, runs, runs.middle)

    def _encode(self, part: str, pieces: list[str]) -> bytes:
        table = self._qp.get(part)
        if table is None:
            return mime.encode_qp("".join(pieces))
        return mime.encode_qp_pieces(pieces, table)

    def compress(self, message: bytes) -> bytes:
        """``compress(message, self.zdict)``, faster (primed dictionary reused)."""
        return self._compressor.compress(message)
