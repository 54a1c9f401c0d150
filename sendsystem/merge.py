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
"""

from __future__ import annotations

import logging
import operator
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from types import MappingProxyType, TracebackType
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from sendsystem import mime
from sendsystem.errors import TemplateError

log = logging.getLogger(__name__)

PARTS = ("subject", "html", "text")
# Rendered output bigger than this is a runaway loop, not a newsletter.
MAX_PART_CHARS = 5_000_000
# Results of `*` on sequences and of `**` are capped (see module docstring).
_MAX_REPEAT = 1_000_000
_MAX_EXPONENT = 1_000
_ZLIB_WINDOW = 32 * 1024
# Level 6 / memLevel 8: measured on the bench newsletter, level 3 is 2x
# faster but 30 % bigger, level 9 saves 8 % for 30 % more time.
_ZLIB_LEVEL = 6
_ZLIB_MEMLEVEL = 8


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
    """One recipient's message could not be rendered; the message says why."""


def _capped_mul(left: Any, right: Any) -> Any:
    for seq, n in ((left, right), (right, left)):
        if (
            isinstance(seq, str | bytes | list | tuple)
            and isinstance(n, int)
            and len(seq) * n > _MAX_REPEAT
        ):
            raise SecurityError(f"repetition result too large (over {_MAX_REPEAT} items)")
    return operator.mul(left, right)


def _capped_pow(left: Any, right: Any) -> Any:
    if isinstance(right, int) and abs(right) > _MAX_EXPONENT:
        raise SecurityError(f"exponent too large (over {_MAX_EXPONENT})")
    return operator.pow(left, right)


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
_MAPPING_ATTRS = {dict: frozenset(dir(dict)), MappingProxyType: frozenset(dir(MappingProxyType))}


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

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
    for node in ast.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise TemplateError(
                f"{part} template, line {node.lineno}: attribute {node.attr!r} is not "
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


def check_template(src: TemplateSource) -> None:
    """Compile every part in the sandbox; TemplateError names the part and line."""
    env = _Environment(jinja2.StrictUndefined)
    for part, source in _sources(src):
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


def _template_line(part: str, tb: TracebackType | None) -> int | None:
    """The template line of a render error, from Jinja's rewritten traceback."""
    line = None
    filename = f"<{part} template>"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render(template: jinja2.Template, part: str, context: dict[str, Any]) -> str:
    try:
        out = template.render(context)
    except Exception as exc:
        # Anything a customer template can raise (undefined name, sandbox
        # violation, a filter's TypeError, ZeroDivisionError ...) fails this
        # recipient only.
        line = _template_line(part, exc.__traceback__)
        where = f"{part} template, line {line}" if line else f"{part} template"
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise MergeError(f"{where}: {reason}") from None
    if len(out) > MAX_PART_CHARS:
        raise MergeError(f"{part} template: output over {MAX_PART_CHARS} characters")
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
            "(internationalised addresses are not supported; use the punycode domain)"
        )
    if any(c <= " " or c == "\x7f" or c in '<>,;"()' for c in email):
        raise MergeError(f"recipient address {email!r} contains a space, control or special char")
    return email.encode("ascii")


def compression_dictionary(src: TemplateSource) -> bytes:
    """The zlib preset dictionary for messages of this template.

    Deterministic from the template alone (and the installed Jinja2), so the
    sort and send workers derive the same one independently: each part is
    rendered with every merge field empty and encoded exactly like a real
    message, in message order, after the constant MIME lines, so that a
    recipient's message is mostly back references into it. A part that cannot
    render that way contributes its raw source instead. Decompressing with a
    different dictionary fails loudly (zlib checks the dictionary's Adler-32),
    never silently.
    """
    env = _Environment(jinja2.ChainableUndefined)
    context: dict[str, Any] = {
        "list": {"name": "", "from": "", "from_address": "", "from_name": ""},
        "newsletter": {"id": 0, "subject": ""},
    }
    rendered: dict[str, str] = {}
    for part, source in _sources(src):
        try:
            rendered[part] = _compile(env, part, source).render(context)
        except Exception:
            rendered[part] = source
    # Newsletter id 0 and no From: the dictionary must not depend on them.
    skeleton = mime.build_skeleton(0, None, src.text is not None, False)
    pieces = [
        b"To: \r\n",
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

    def __init__(self, src: TemplateSource, info: NewsletterInfo) -> None:
        env = _Environment(jinja2.StrictUndefined)
        self._subject = _compile(env, "subject", src.subject)
        self._html = _compile(env, "html", src.html)
        self._text = _compile(env, "text", src.text) if src.text is not None else None
        self._info = info
        self._list = _list_object(info)
        try:
            self._skeleton = mime.build_skeleton(
                info.newsletter_id, info.from_header, src.text is not None, info.has_attachments
            )
        except ValueError as exc:
            raise TemplateError(f"cannot build messages: {exc}") from None
        self.zdict: bytes = compression_dictionary(src)
        self._compressor = Compressor(self.zdict)

    def render(self, email: str, fields: Mapping[str, str], unsubscribe_url: str) -> bytes:
        """The stored form of one recipient's message (RFC 5322, CRLF, 7-bit).

        Raises MergeError when this recipient's message cannot be built.
        """
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
        subject = mime.safe_header_value(_render(self._subject, "subject", context))
        newsletter["subject"] = subject
        html = _render(self._html, "html", context)
        sk = self._skeleton
        head = (sk.from_line, b"To: ", to, b"\r\n", mime.header_line("Subject", subject), sk.head)
        if self._text is None:
            return b"".join((*head, mime.encode_qp(html), sk.end))
        text = _render(self._text, "text", context)
        return b"".join((*head, mime.encode_qp(text), sk.mid, mime.encode_qp(html), sk.end))

    def compress(self, message: bytes) -> bytes:
        """``compress(message, self.zdict)``, faster (primed dictionary reused)."""
        return self._compressor.compress(message)
