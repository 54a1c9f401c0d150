"""MIME building blocks for the merge hot path and the per-send finalisation.

Building an ``email.message.EmailMessage`` per recipient costs milliseconds.
Instead the structure of a newsletter's messages is fixed once (a *skeleton*
of byte pieces) and each recipient's rendered parts are spliced in, encoded
with the C quoted-printable encoder of ``binascii``.

Decisions worth knowing:

- Boundaries are deterministic per newsletter (``=_ss_alt_<id>``,
  ``=_ss_mix_<id>``): identical bytes in every message of a newsletter
  compress to nothing, and a boundary starting with ``=_`` can never occur in
  quoted-printable or base64 content (QP writes ``=`` only before two hex
  digits or a line break; base64 has no ``_``). Neither boundary is a prefix of
  the other, so even prefix-matching parsers split correctly.
- Bodies are always quoted-printable, UTF-8: 7-bit safe for any relay, lines
  below 76 characters, readable in the raw source, and it compresses far
  better against a shared dictionary than base64 does.
- A message of a newsletter with attachments is stored as a multipart/mixed
  whose only stored part is the multipart/alternative; the mixed part is left
  unterminated and :func:`attachment_tail` (computed once per newsletter,
  never stored per message) supplies the attachment parts and the closing
  boundary at send time.
- Per-send headers (Message-ID, Date, List-Unsubscribe, ...) are prepended by
  :func:`finalize`, so the stored, compressed message never depends on when or
  how often it is sent.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import MIMEPart
from operator import itemgetter

CRLF = b"\r\n"

# Anything that could end a header line or confuse a mail client: C0 and C1
# controls (CR, LF, TAB, NUL, ESC ...) and the Unicode line/paragraph
# separators.
_CONTROL_RUN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# RFC 5322 field names: printable ASCII except the colon.
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")

# RFC 2047: an encoded-word is at most 75 characters and a line holding one
# at most 76; "=?utf-8?b?" + "?=" take 12 of them.
_EW_OVERHEAD = 12
_EW_LINE = 76
_FOLD_AT = 78  # RFC 5322 "SHOULD" line length
_HARD_LIMIT = 998  # RFC 5322 "MUST" line length

_SMTP = email.policy.SMTP

# What finalize() checks a stored message with: a first header field, and the
# Content-Type build_skeleton() writes for a newsletter with attachments.
_STORED_FIELD = re.compile(rb"[!-9;-~]+:")
_MIXED_TYPE = b"Content-Type: multipart/mixed;"
_MIXED_LINE = CRLF + _MIXED_TYPE  # at a line start: never inside a Subject value


def safe_header_value(value: str) -> str:
    """Collapse every run of CR/LF/control characters to one space (and trim).

    No merge value can then start a new header or end the header block.
    """
    return _CONTROL_RUN.sub(" ", value).strip()


def alternative_boundary(newsletter_id: int) -> str:
    return f"=_ss_alt_{newsletter_id}"


def mixed_boundary(newsletter_id: int) -> str:
    return f"=_ss_mix_{newsletter_id}"


def encode_qp(text: str) -> bytes:
    """A rendered text or HTML part as quoted-printable UTF-8 with CRLF lines.

    ``b2a_qp`` escapes ``=``, trailing blanks, a leading ``.`` and everything
    non-ASCII, and inserts soft breaks below 76 columns. It keeps the line
    ending style it finds, so it is fed bare LF (the common case, no copy) and
    its output, which has no other CR or LF, is converted to CRLF in one C pass.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    qp = binascii.b2a_qp(text.encode("utf-8", "surrogatepass"), False, True, False)
    return qp.replace(b"\n", b"\r\n")


# The quoted-printable of a template's literal text, split at its first and last
# newline: (text up to the first newline, the lines in between encoded, the rest).
QpTable = dict[str, tuple[str, bytes, str]]


def _qp_lf(text: str) -> bytes:
    return binascii.b2a_qp(text.encode("utf-8", "surrogatepass"), False, True, False)


def qp_table(literals: Iterable[str]) -> QpTable:
    """What :func:`encode_qp_pieces` needs to encode these literal texts only once.

    Why a line can be encoded alone: ``b2a_qp`` (text mode, LF) starts every line
    afresh (the soft-break column, a lone '.', a blank before the newline are all
    decided within the line), and only the data's last line, without a newline,
    is treated as the end. So the lines strictly between a literal's first and
    last newline encode the same wherever the literal stands.
    """
    table: QpTable = {}
    for text in literals:
        first, last = text.find("\n"), text.rfind("\n")
        if first >= 0 and "\r" not in text:
            table[text] = (text[:first + 1], _qp_lf(text[first + 1:last + 1]), text[last + 1:])
    return table


def qp_learn(table: QpTable, pieces: Sequence[str], *, min_chars: int, budget: int) -> int:
    """Add to ``table`` the pieces of at least ``min_chars`` with a newline, while
    their characters fit in ``budget``; what is left of the budget. For pieces that
    recur across messages but are not a template's literals (the text between a
    tracked message's links). Any text is a valid entry (see :func:`qp_table`), so
    what is learned never changes a byte."""
    for text in pieces:
        if len(text) >= min_chars and len(text) <= budget and text not in table:
            before = len(table)
            table.update(qp_table((text,)))
            if len(table) > before:
                budget -= len(text)
    return budget


def encode_qp_pieces(pieces: Sequence[str], table: QpTable,
                     lines: Callable[[str], bytes] = _qp_lf,
                     middle: Callable[[bytes], bytes] | None = None) -> bytes:
    """``encode_qp("".join(pieces))``, with the pieces found in ``table`` encoded once.

    Text is gathered up to and including a known literal's first newline, encoded,
    followed by the literal's encoded middle lines; its rest starts the next run.
    Each run starts a line and ends one (or the text), so it encodes the same
    wherever it stands; ``lines`` encodes it (``b2a_qp`` with bare LF, or a
    :class:`MarkedRuns`). ``middle`` finishes a known literal's encoded middle lines.
    """
    out: list[bytes] = []
    run: list[str] = []
    for piece in pieces:
        known = table.get(piece)
        if known is None:
            if "\r" in piece:  # line ends to normalise first: the whole way
                return encode_qp("".join(pieces))
            run.append(piece)
            continue
        run.append(known[0])
        out.append(lines("".join(run)))
        out.append(known[1] if middle is None else middle(known[1]))
        run = [known[2]]
    out.append(lines("".join(run)))
    return b"".join(out).replace(b"\n", b"\r\n")


class MarkedRuns:
    """Quoted-printable of tracked HTML whose pieces hold a mark where the message's token
    goes: what recurs is encoded once, with the mark, and each message's token is put
    where the mark stands.

    A tracked message's links all carry the message's token (tracking/tokens.py), so
    its text differs from another message's there and in the merge values only, and
    ``b2a_qp`` costs ~10 ns a byte. So the rewriter writes a mark instead: random
    URL-safe base64 (A-Z, a-z, 0-9, ``-``, ``_``) of the token's length, which no
    document holds. ``b2a_qp`` copies each such character as one column and decides
    every soft break, escape and line end exactly as it would around the token, so
    text encoded with the mark, the mark then replaced by the token, is the text
    encoded with the token: byte for byte. A soft break may fall inside a mark; where
    it does is found once and kept.

    Two things are learned, while ``learn`` is set: the runs of
    :func:`encode_qp_pieces` (``__call__``; up to ``max_runs``) and, by
    :meth:`learn_pieces`, long pieces whose middle lines hold marks (the text between
    two merge values of a planned render, tracking/links.py), whose encoded middle is
    then cut where the marks stand (:meth:`middle` puts the token in).
    """

    def __init__(self, max_runs: int) -> None:
        self._runs: dict[str, _Holes] = {}
        self._middles: dict[bytes, _Holes] = {}
        self._splits: set[int] = set()          # where soft breaks cut learned marks
        self._forms: dict[int, bytes] = {}      # the message's token in those forms
        self._max = max_runs
        self._mark = ""
        self._mark_b = b""
        self._token = b""
        self._token_s = ""
        self.learn = False

    def begin(self, mark: str, token: str, learn: bool) -> None:
        """A new message, whose ``token`` stands as ``mark`` in its pieces."""
        if len(mark) != len(token) or not token.isascii():
            raise ValueError("a token and its mark differ in length")
        # What was learned with another mark stays: its texts hold that mark, so they
        # are found again only when it is back (token lengths go 16, 20, ... as ids grow).
        if mark != self._mark:
            self._mark, self._mark_b = mark, mark.encode("ascii")
        self._token, self._token_s = token.encode("ascii"), token
        self._forms = self._token_forms(self._splits)
        self.learn = learn

    def _token_forms(self, splits: Iterable[int]) -> dict[int, bytes]:
        """The token as the learned encodings need it: whole (0) and cut by a soft break
        after k characters, for each k they have."""
        tok = self._token
        forms = {k: tok[:k] + b"=\n" + tok[k:] for k in splits if k}
        forms[0] = tok
        return forms

    def __call__(self, text: str) -> bytes:
        holes = self._runs.get(text) if self._runs else None
        if holes is None:
            if self._mark not in text:
                return _qp_lf(text)
            if self.learn and len(self._runs) < self._max:
                holes = self._learn(_qp_lf(text), text.count(self._mark))
                if holes is not None:
                    self._runs[text] = holes
            if holes is None:
                return _qp_lf(text.replace(self._mark, self._token_s))
        return self._fill(holes)

    def learn_pieces(self, table: QpTable, pieces: Sequence[str], *, min_chars: int,
                     budget: int) -> int:
        """:func:`qp_learn` for tracked pieces: a piece whose middle lines hold marks is
        kept only if every mark can be cut out of their encoding."""
        mark = self._mark
        fresh = [p for p in pieces if len(p) >= min_chars and p not in table]
        budget = qp_learn(table, fresh, min_chars=min_chars, budget=budget)
        for piece in fresh:
            entry = table.get(piece)
            if entry is None:
                continue
            count = piece.count(mark) - entry[0].count(mark) - entry[2].count(mark)
            if count:
                holes = self._learn(entry[1], count)
                if holes is None:
                    del table[piece]
                else:
                    self._middles[entry[1]] = holes
        return budget

    def middle(self, encoded: bytes) -> bytes:
        """A learned piece's encoded middle lines with the token where the marks stand."""
        holes = self._middles.get(encoded)
        return encoded if holes is None else self._fill(holes)

    def _learn(self, encoded: bytes, count: int) -> _Holes | None:
        """``encoded`` (with ``count`` marks) cut where they stand, or None."""
        cut = _cut(encoded, self._mark_b, count)
        if cut is None:
            return None
        parts, splits = cut
        self._splits.update(splits)
        self._forms.update(self._token_forms(splits))
        return parts, _picker(splits)

    def _fill(self, holes: _Holes) -> bytes:
        """A learned encoding with this message's token where the marks stood."""
        parts, forms = holes
        out: list[bytes] = [b""] * (2 * len(parts) - 1)
        out[::2] = parts
        out[1::2] = forms(self._forms)
        return b"".join(out)


# An encoding cut where the marks stand: the bytes around them, and what picks, from the
# token's forms by where a soft break cuts it (0: whole), the form each mark needs.
_Holes = tuple[tuple[bytes, ...], Callable[[dict[int, bytes]], tuple[bytes, ...]]]


def _picker(keys: tuple[int, ...]) -> Callable[[dict[int, bytes]], tuple[bytes, ...]]:
    """``lambda d: tuple(d[k] for k in keys)``, in C (itemgetter returns a bare item
    for one key)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda forms: (forms[key],)
    return itemgetter(*keys)


def _cut(encoded: bytes, mark: bytes, count: int
         ) -> tuple[tuple[bytes, ...], tuple[int, ...]] | None:
    """``encoded`` cut at each of the ``count`` places ``mark`` stands, whole or cut by a
    soft break (the bytes around them, and for each where: 0 whole); None when they are
    not all found, in order."""
    forms = [mark] + [mark[:k] + b"=\n" + mark[k:] for k in range(1, len(mark))]
    parts: list[bytes] = []
    splits: list[int] = []
    pos = 0
    for _ in range(count):
        found = [(at, k) for k, form in enumerate(forms) if (at := encoded.find(form, pos)) >= 0]
        if not found:
            return None
        at, k = min(found)
        parts.append(encoded[pos:at])
        splits.append(k)
        pos = at + len(forms[k])
    parts.append(encoded[pos:])
    if any(form in parts[-1] for form in forms):
        return None
    return tuple(parts), tuple(splits)


def _b_word(text: str) -> bytes:
    return b"=?utf-8?b?" + base64.b64encode(text.encode("utf-8")) + b"?="


def _encoded_words(value: str, first_room: int) -> list[bytes]:
    """Split ``value`` into RFC 2047 base64 encoded-words.

    The first word fits in ``first_room`` characters (what is left of the
    line after "Name: "), the others on a continuation line of their own.
    Splits only between characters, never inside a UTF-8 sequence.
    """

    def budget(room: int) -> int:  # UTF-8 bytes whose base64 fits in room
        return max(3, (room - _EW_OVERHEAD) // 4 * 3)

    limit = budget(first_room)
    if len(value.encode("utf-8")) <= limit:
        return [_b_word(value)]
    words: list[bytes] = []
    chunk: list[str] = []
    size = 0
    for ch in value:
        n = len(ch.encode("utf-8"))
        if size + n > limit and chunk:
            words.append(_b_word("".join(chunk)))
            chunk, size, limit = [], 0, budget(_EW_LINE - 1)
        chunk.append(ch)
        size += n
    words.append(_b_word("".join(chunk)))
    return words


def header_line(name: str, value: str) -> bytes:
    """One unstructured header (e.g. Subject) as folded, 7-bit bytes ending in CRLF.

    ``value`` must already be free of control characters (see
    :func:`safe_header_value`). ASCII that fits is written as is; ASCII that is
    long is folded at spaces (lines stay within 78 characters); anything
    non-ASCII, anything that looks like an encoded-word, or a word too long to
    fold becomes RFC 2047 encoded-words.
    """
    prefix = name.encode("ascii") + b": "
    if value.isascii() and "=?" not in value:
        line = prefix + value.encode("ascii")
        if len(line) <= _FOLD_AT:
            return line + CRLF
        words = value.split(" ")
        # Fold at spaces when every piece then fits; one unbreakable run
        # longer than a line is sent as encoded-words instead (still short lines).
        if len(words[0]) + len(prefix) <= _FOLD_AT and max(len(w) for w in words) < _FOLD_AT:
            return _fold_words(prefix, [w.encode("ascii") for w in words])
    if not value:
        return prefix.rstrip() + CRLF
    # Encoded-words separated by folding whitespace: decoders drop that
    # whitespace, so the value round-trips exactly.
    return _fold_words(prefix, _encoded_words(value, _EW_LINE - len(prefix)))


def _fold_words(prefix: bytes, words: Sequence[bytes]) -> bytes:
    lines: list[bytes] = []
    line = prefix + words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = b" " + word
        else:
            line += b" " + word
    lines.append(line)
    return b"\r\n".join(lines) + CRLF


def address_header(name: str, value: str) -> bytes:
    """A structured address header (From) folded and encoded by the email package.

    Called once per newsletter, so the standard library's careful (and slow)
    folder is the right tool.
    """
    header = _SMTP.header_factory(name, value)
    if header.defects:
        raise ValueError(f"{name} header {value!r} is not valid: {header.defects[0]}")
    folded: str = header.fold(policy=_SMTP)
    return folded.encode("ascii")


@dataclass(frozen=True)
class Skeleton:
    """The constant byte pieces of every message of one newsletter.

    A message is ``from_line + b"To: " + addr + CRLF + subject_line + head +
    qp(text) + mid + qp(html) + end``; without a text part ``mid`` is empty
    and the text slot is skipped.
    """

    from_line: bytes
    head: bytes
    mid: bytes
    end: bytes
    has_text: bool


def _part_headers(subtype: str) -> bytes:
    return (
        b"Content-Type: text/" + subtype.encode() + b'; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )


def build_skeleton(
    newsletter_id: int, from_header: str | None, has_text: bool, has_attachments: bool
) -> Skeleton:
    """Lay out the MIME structure once per newsletter.

    Without a text part the message (or, with attachments, the first part of
    the mixed) is a single text/html part rather than an alternative with one
    member. ``from_header`` None leaves the From line out (dictionary use).
    """
    alt = alternative_boundary(newsletter_id).encode()
    mix = mixed_boundary(newsletter_id).encode()
    html_headers = _part_headers("html")
    if has_text:
        alt_type = b'Content-Type: multipart/alternative; boundary="' + alt + b'"\r\n'
        body_head = alt_type + CRLF + b"--" + alt + CRLF + _part_headers("plain") + CRLF
        mid = CRLF + b"--" + alt + CRLF + html_headers + CRLF
        body_end = CRLF + b"--" + alt + b"--" + CRLF
    else:
        body_head = html_headers + CRLF
        mid = b""
        body_end = CRLF
    if has_attachments:
        mixed_type = b'Content-Type: multipart/mixed; boundary="' + mix + b'"\r\n'
        head = mixed_type + CRLF + b"--" + mix + CRLF + body_head
        # Unterminated on purpose: attachment_tail() starts with the next
        # "--mix" delimiter line and ends with the closing one.
        end = body_end
    else:
        head = body_head
        end = body_end
    return Skeleton(
        from_line=address_header("From", from_header) if from_header is not None else b"",
        head=b"MIME-Version: 1.0\r\n" + head,
        mid=mid,
        end=end,
        has_text=has_text,
    )


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


def attachment_tail(newsletter_id: int, attachments: Sequence[Attachment]) -> bytes:
    """The bytes appended to every stored message of a newsletter with attachments.

    Built with the email package (RFC 2231 filenames, base64 lines), once per
    newsletter; the send worker caches it. ``b""`` when there are none.
    """
    if not attachments:
        return b""
    mix = mixed_boundary(newsletter_id).encode()
    pieces: list[bytes] = []
    for att in attachments:
        maintype, sep, subtype = att.content_type.partition("/")
        if not sep or not maintype or not subtype:
            maintype, subtype = "application", "octet-stream"
        part = MIMEPart(policy=_SMTP)
        part.set_content(
            att.data,
            maintype=maintype,
            subtype=subtype,
            cte="base64",
            disposition="attachment",
            filename=safe_header_value(att.filename) or "attachment",
        )
        body = part.as_bytes(policy=_SMTP)
        if not body.endswith(CRLF):
            body += CRLF
        pieces.append(b"--" + mix + CRLF + body)
    pieces.append(b"--" + mix + b"--" + CRLF)
    return b"".join(pieces)


def finalize(stored: bytes, tail: bytes, headers: Sequence[tuple[str, str]],
             fixed: bytes = b"") -> bytes:
    """The wire bytes of one send: per-send ``headers``, ``fixed`` (header lines
    already built by :func:`header_lines`), the stored message, ``tail``.

    Raises ValueError for a header name that is not a valid field name or a
    value containing CR, LF or another control character (a header injection
    attempt or a bug upstream: never silently repaired here). Non-ASCII values
    are RFC 2047 encoded.

    The stored message is checked as far as it costs nothing per message (a
    scan of its header block): it must start with a header field and have a
    header/body separator, and it must be a multipart/mixed exactly when there
    is a ``tail`` -- attachments appended to a message that has no place for
    them, or a mixed message left unterminated because its newsletter's
    attachments are gone, would reach the recipient broken. ValueError
    otherwise, so the send worker fails that message with the reason.
    """
    end = stored.find(b"\r\n\r\n")
    if end < 0 or not _STORED_FIELD.match(stored):
        raise ValueError("the stored message has no header block (not a merged message)")
    mixed = stored.startswith(_MIXED_TYPE) or stored.find(_MIXED_LINE, 0, end) >= 0
    if mixed and not tail:
        raise ValueError("the stored message expects attachments but its newsletter has "
                         "none (attachment rows deleted?)")
    if tail and not mixed:
        raise ValueError("its newsletter has attachments but the stored message has no "
                         "place for them (merged before they were added?)")
    return b"".join((header_lines(headers), fixed, stored, tail))


def header_lines(headers: Sequence[tuple[str, str]]) -> bytes:
    """``headers`` as wire lines, checked and encoded as :func:`finalize` describes.

    The send worker builds the headers that are the same for every message of a
    newsletter once with this and passes them to finalize() as ``fixed``.
    """
    lines: list[bytes] = []
    for name, value in headers:
        if not _HEADER_NAME.match(name):
            raise ValueError(f"invalid header name {name!r}")
        if _CONTROL_RUN.search(value):
            raise ValueError(f"header {name} contains a control character (CR/LF?): {value!r}")
        if value.isascii() and len(name) + len(value) + 2 <= _HARD_LIMIT:
            lines.append(f"{name}: {value}\r\n".encode("ascii"))
        else:
            lines.append(header_line(name, value))
    return b"".join(lines)


def list_id(list_name: str, list_key: str, domain: str) -> str:
    """A List-Id value (RFC 2919): ``"Name" <key.domain>``; non-ASCII names encoded.

    ``list_key`` must be a dot-atom-safe identifier (e.g. the list's id).
    """
    phrase = safe_header_value(list_name).replace("\\", "").replace('"', "")
    ident = f"<{list_key}.{domain}>"
    if phrase.isascii():
        return f'"{phrase}" {ident}' if phrase else ident
    words = b" ".join(_encoded_words(phrase, _EW_LINE - len("List-Id: "))).decode("ascii")
    return f"{words} {ident}"
