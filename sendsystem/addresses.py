"""E-mail address validation and From-header parsing.

Checks what an MTA will refuse or what would be unsafe in a header: RFC 5321
length limits, a dot-atom local part (quoted local parts are legal but are in
practice only ever typos or attacks in subscriber lists), a domain of valid
labels with a TLD, internationalised domains converted with IDNA, and no
whitespace or control characters anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.utils import parseaddr
from functools import lru_cache

_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")


def validate_email(raw: str) -> str:
    """The address, normalised (domain lower-cased, IDNA); ValueError says why not."""
    address = raw.strip()
    if not address:
        raise ValueError("empty address")
    if _CONTROL_RE.search(address):
        raise ValueError(f"{raw!r} contains whitespace or control characters")
    if address.count("@") != 1:
        raise ValueError(f"{address!r} must contain exactly one @")
    local, domain = address.split("@")
    if not local or len(local) > 64:
        raise ValueError(f"{address!r}: the part before @ must be 1 to 64 characters")
    if not _LOCAL_RE.match(local):
        raise ValueError(f"{address!r}: invalid characters or dots before @")
    domain = domain.rstrip(".").lower()
    ascii_domain, problem = _check_domain(domain)
    if problem is not None:
        raise ValueError(f"{address!r}: {problem}")
    result = f"{local}@{ascii_domain}"
    if len(result) > 254:
        raise ValueError(f"{address!r} is longer than 254 characters")
    return result


@lru_cache(maxsize=8192)
def _check_domain(domain: str) -> tuple[str, str | None]:
    """(IDNA form, None) or ("", why not). Cached: a list of millions has few domains,
    and the IDNA codec was a quarter of the time of an import's validation."""
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "", f"invalid domain {domain!r}"
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL_RE.match(label) for label in labels):
        return "", f"invalid domain {domain!r}"
    if labels[-1].isdigit():
        return "", "the domain needs a top-level domain, not an IP"
    return ascii_domain, None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True)
class FromAddress:
    name: str
    address: str

    def header(self) -> str:
        return str(Address(display_name=self.name, addr_spec=self.address))


def parse_from(raw: str) -> FromAddress:
    """Parse ``"Name <addr@example.com>"`` (or a bare address)."""
    if "\r" in raw or "\n" in raw:
        raise ValueError("the From address must be on one line")
    name, addr = parseaddr(raw)
    if not addr:
        raise ValueError(f"{raw!r} is not of the form 'Name <address@example.com>'")
    return FromAddress(name=name.strip(), address=validate_email(addr))
