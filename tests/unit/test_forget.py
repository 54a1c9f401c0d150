"""`subscriber forget`, the pure parts: which text is the address, and redaction."""

from __future__ import annotations

import re

import pytest

from sendsystem.errors import UserError
from sendsystem.forget import (
    ANY_ADDRESS,
    _forms,
    address_pattern,
    forgotten,
    redact_addresses,
    url_pattern,
)

# The database runs these patterns (PCRE); Python's re reads the same syntax.
ODD = "a.b+c'd{x}=y@Example.com"


@pytest.mark.parametrize(("text", "hits"), [
    ("550 5.1.1 <a.b+c'd{x}=y@example.com>: User unknown", 1),
    ("A.B+C'D{X}=Y@EXAMPLE.COM, again a.b+c'd{x}=y@example.com.", 2),  # any case; a full stop
    ("za.b+c'd{x}=y@example.com", 0),          # a longer address is someone else's
    ("a.b+c'd{x}=y@example.com.dk", 0),         # so is a longer domain
    ("a.b+c'd{x}=y@example-com", 0),            # the dot is a dot, not any character
    ("aXb+c'd{x}=y@example.com", 0),
])
def test_address_pattern(text: str, hits: int) -> None:
    assert len(re.findall(address_pattern(ODD), text)) == hits


def test_redact_every_address_of_a_row() -> None:
    text = "550 5.1.1 <Ann@X.example>: forwarded to ann.b@y.example; (see postmaster@y.example)"
    assert redact_addresses(text) == ("550 5.1.1 <[forgotten]>: forwarded to [forgotten]; "
                                      "(see [forgotten])")
    assert redact_addresses(None) is None
    assert redact_addresses("250 2.0.0 Ok: queued as 4ABC") == "250 2.0.0 Ok: queued as 4ABC"
    assert re.compile(ANY_ADDRESS).search("o'brien@x.example").group(0) == "o'brien@x.example"


def test_placeholder_and_forms() -> None:
    assert forgotten("forgotten-12@forgotten.invalid") and not forgotten("a@example.com")
    assert _forms(" Ann@BÜCHER.example ") == ("Ann@xn--bcher-kva.example",
                                              ["Ann@xn--bcher-kva.example",
                                               "Ann@BÜCHER.example"])
    assert _forms("ann@example.com") == ("ann@example.com", ["ann@example.com"])
    assert _forms("Odd..Stored@Example.com")[1] == ["Odd..Stored@Example.com"]  # as stored
    for bad in ("", "no-at-sign", "a b@example.com"):
        with pytest.raises(UserError):
            _forms(bad)


@pytest.mark.parametrize(("url", "hits"), [
    ("https://shop.example/?who=a.b%2Bc%27d%7Bx%7D%3Dy%40example.com&x=1", 1),
    ("https://shop.example/?who=A.B%2bC%27D%7bX%7d%3dY@EXAMPLE.COM", 1),  # '@' left as is
    ("https://shop.example/u/a.b+c'd{x}=y@example.com?x", 1),
    ("https://shop.example/?who=a.b%2Bc%27d%7Bx%7D%3Dy%40example.com.dk", 0),
])
def test_url_pattern(url: str, hits: int) -> None:
    assert len(re.findall(url_pattern(ODD), url)) == hits
