"""One message's final bytes, at send time: what the send worker adds to the stored merge.

The sort worker stores each message merged and compressed, without anything
that depends on when or how often it is sent. At send time this module adds:

* the per-send headers (:func:`send_headers`): a signed, deterministic
  Message-ID (a retry keeps it, so a bounce of any attempt maps to the one
  message), Date, List-Unsubscribe with a signed token (an https URL and a
  mailto) plus List-Unsubscribe-Post for one-click (RFC 8058), List-Id
  (RFC 2919, :func:`sendsystem.mime.list_id`) and Precedence: bulk;
* the newsletter's attachment parts, built once per newsletter
  (:class:`NewsletterParts`) and appended to every message of it;
* a DKIM signature when ``[dkim] key_file`` is set;
* the envelope: a signed VERP sender, so a bounce can be tied to this message
  and nobody else can forge one.

Everything per newsletter is built once per worker (:class:`Composer` keeps
it); what is left per message is one decompression, a few header lines and
the signature.

A message that cannot be built raises :class:`BuildError` with the step that
refused it and why (a body that does not decompress, one that
:func:`sendsystem.mime.finalize` refuses, a DKIM error); a newsletter whose
shared parts cannot be built gets ``NewsletterParts.broken``, and every
message of it fails with that reason. The send worker records either as the
message's ``failed`` reply and goes on (the poison-message rule); nothing
here touches the database.
"""

from __future__ import annotations

import email.utils
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Config
from .delivery import Envelope, reason_line
from .merge import TemplateSource, compression_dictionary, decompress
from .mime import Attachment, attachment_tail, finalize, header_lines, list_id
from .tokens import message_id_header, unsubscribe_token, verp_address

if TYPE_CHECKING:
    from .dkim import DkimSigner

log = logging.getLogger(__name__)


class BuildError(Exception):
    """One message cannot be built; ``str()`` is the reason recorded for it."""


@dataclass
class NewsletterParts:
    """What every message of one newsletter shares, built once per worker."""

    newsletter_id: int
    list_id: int
    list_name: str
    zdict: bytes
    tail: bytes
    list_id_header: str = ""  # the List-Id value
    # newsletter_headers() as wire lines, built once (message_headers() are per send).
    fixed_headers: bytes = b""
    relay_group: str = ""  # the list's relay group ("" = the default group)
    # Set when the shared parts cannot be built: every message of it fails with it.
    broken: str | None = None


def newsletter_zdict(row: Mapping[str, Any]) -> bytes:
    """The stored compression dictionary (computed once by a sort worker's render child).

    A newsletter merged before schema version 3 has none stored: its
    messages were compressed with the dictionary derived from the template,
    so derive it the same way (renders customer code in this process, as
    before; only such old newsletters take this path).
    """
    if row["zdict"] is not None:
        return bytes(row["zdict"])
    return compression_dictionary(TemplateSource(subject=row["subject"], html=row["html"],
                                                 text=row["text"]))


def newsletter_parts(row: Mapping[str, Any], attachments: Sequence[Mapping[str, Any]],
                     domain: str) -> NewsletterParts:
    """The shared parts of a newsletter (its ``newsletter_get`` row and attachment rows).

    Never raises for what it read: a corrupt attachment, a dictionary that cannot
    be derived, anything else, sets ``broken`` instead (and is logged once here).
    """
    nid = int(row["id"])
    parts = NewsletterParts(newsletter_id=nid, list_id=int(row["list_id"]),
                            list_name=str(row["list_name"]), zdict=b"", tail=b"",
                            relay_group=str(row.get("relay_group") or ""))
    try:
        parts.list_id_header = list_id(parts.list_name, f"list{parts.list_id}", domain)
        parts.fixed_headers = header_lines(newsletter_headers(parts.list_id_header))
        parts.zdict = newsletter_zdict(row)
        for a in attachments:
            data = a["data"]
            if data is None or len(data) != int(a["size"]):
                got = "no data" if data is None else f"{len(data)} bytes"
                raise BuildError(f"attachment {a['filename']!r} (id {a['id']}) is corrupt: "
                                 f"{got} stored, {a['size']} expected")
        parts.tail = attachment_tail(nid, [
            Attachment(a["filename"], a["content_type"], a["data"]) for a in attachments])
    except BuildError as exc:
        parts.broken = f"newsletter {nid}: {exc}"
    except Exception as exc:
        log.exception("newsletter %s: cannot build the parts its messages share", nid)
        parts.broken = reason_line(f"newsletter {nid}: its shared parts cannot be built", exc)
    if parts.broken is not None:
        log.error("newsletter %s: every message of it fails here: %s", nid, parts.broken)
    return parts


def send_headers(*, message_id: str, date: str, unsubscribe_url: str, unsubscribe_mailto: str,
                 token: str, list_id_header: str) -> list[tuple[str, str]]:
    """The headers added to a stored message at each send, in their order on the wire."""
    return [*message_headers(message_id=message_id, date=date,
                             unsubscribe_url=unsubscribe_url,
                             unsubscribe_mailto=unsubscribe_mailto, token=token),
            *newsletter_headers(list_id_header)]


def message_headers(*, message_id: str, date: str, unsubscribe_url: str,
                    unsubscribe_mailto: str, token: str) -> list[tuple[str, str]]:
    """The first of :func:`send_headers`: those that differ from message to message."""
    return [
        ("Message-ID", message_id),
        ("Date", date),
        ("List-Unsubscribe", f"<{unsubscribe_url}>, <mailto:{unsubscribe_mailto}"
                             f"?subject=unsubscribe%20{token}>"),
    ]


def newsletter_headers(list_id_header: str) -> list[tuple[str, str]]:
    """The rest of :func:`send_headers`: the same for every message of a newsletter,
    so they are built into bytes once (``NewsletterParts.fixed_headers``)."""
    return [
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("List-Id", list_id_header),
        ("Precedence", "bulk"),
    ]


def wire_bytes(body: bytes, parts: NewsletterParts, headers: Sequence[tuple[str, str]],
               signer: DkimSigner | None, fixed: bytes = b"") -> bytes:
    """Decompress the stored ``body``, add ``headers``, the ``fixed`` header lines
    (:func:`sendsystem.mime.header_lines`) and the attachments, sign.
    BuildError says which step refused it and why."""
    try:
        stored = decompress(body, parts.zdict)
    except zlib.error as exc:
        raise BuildError(f"stored body is corrupt (zlib: {exc})") from None
    try:
        data = finalize(stored, parts.tail, headers, fixed)
    except ValueError as exc:
        raise BuildError(f"refused by finalize: {exc}") from None
    if signer is not None:
        try:
            data = signer.sign(data)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BuildError(f"DKIM signing failed: {exc}") from None
    return data


def dkim_signer(config: Config) -> DkimSigner | None:
    """The configured DKIM signer, or None when ``[dkim]`` has no key."""
    if not config.dkim.enabled:
        return None
    from .dkim import DkimSigner  # only when signing: it loads the crypto library
    assert config.dkim.key_file is not None
    return DkimSigner.from_file(config.dkim.domain, config.dkim.selector,
                                config.dkim.key_file)


class Composer:
    """Builds envelopes for one send worker: its secret, config, signer and the
    per-newsletter parts, built once each (:meth:`remember`)."""

    def __init__(self, config: Config, secret: bytes, signer: DkimSigner | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.domain = config.sending.envelope_domain
        self.unsubscribe_url = config.unsubscribe.url
        self.unsubscribe_mailto = config.unsubscribe.mailto
        self.signer = signer
        self.clock = clock
        # Per newsletter: its parts, or None when the newsletter is gone.
        self.parts: dict[int, NewsletterParts | None] = {}
        self._date = ("", 0)

    def remember(self, newsletter_id: int, row: Mapping[str, Any] | None,
                 attachments: Sequence[Mapping[str, Any]]) -> NewsletterParts | None:
        """Build and keep a newsletter's parts from its rows (``row`` None: it is gone)."""
        parts = None if row is None else newsletter_parts(row, attachments, self.domain)
        self.parts[newsletter_id] = parts
        return parts

    def message_id(self, message_id: int, newsletter_id: int) -> str:
        return message_id_header(self.secret, message_id, newsletter_id, self.domain)

    def date(self) -> str:
        """The Date header for now; formatted once a second, not once a message."""
        now = int(self.clock())
        if self._date[1] != now:
            self._date = (email.utils.formatdate(now, usegmt=True), now)
        return self._date[0]

    def envelope(self, row: Mapping[str, Any], parts: NewsletterParts) -> Envelope:
        """The envelope of one ``send_batch_messages`` row; BuildError when it cannot be
        built (also when its newsletter's parts are broken)."""
        if parts.broken is not None:
            raise BuildError(parts.broken)
        mid = int(row["id"])
        token = unsubscribe_token(self.secret, int(row["subscriber_id"]), parts.list_id,
                                  parts.newsletter_id)
        message_id = self.message_id(mid, parts.newsletter_id)
        headers = message_headers(
            message_id=message_id, date=self.date(),
            unsubscribe_url=self.unsubscribe_url.format(token=token),
            unsubscribe_mailto=self.unsubscribe_mailto, token=token)
        return Envelope(key=mid, sender=verp_address(self.secret, mid, self.domain),
                        recipient=row["email"],
                        data=wire_bytes(row["body"], parts, headers, self.signer,
                                        parts.fixed_headers),
                        group=parts.relay_group, message_id=message_id)
