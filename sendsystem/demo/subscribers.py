"""Fake subscribers for the demo and the benches: deterministic Danish names, five merge fields.

Danish on purpose: æ, ø and å in names and cities exercise UTF-8 all the way
from the CSV import to the SMTP wire.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from pathlib import Path

FIRST_NAMES = (
    "Anne", "Mette", "Kirsten", "Hanne", "Helle", "Susanne", "Lene", "Maria", "Marianne",
    "Inge", "Camilla", "Sofie", "Ida", "Freja", "Emma", "Karen", "Birgitte", "Louise",
    "Peter", "Jens", "Lars", "Michael", "Henrik", "Søren", "Thomas", "Niels", "Jan",
    "Rasmus", "Mads", "Frederik", "Mikkel", "Anders", "Christian", "Jørgen", "Kasper",
    "Emil", "Magnus", "Oliver", "Ærling", "Åse", "Bjørn", "Asger", "Troels", "Signe",
)
LAST_NAMES = (
    "Nielsen", "Jensen", "Hansen", "Pedersen", "Andersen", "Christensen", "Larsen",
    "Sørensen", "Rasmussen", "Jørgensen", "Petersen", "Madsen", "Kristensen", "Olsen",
    "Thomsen", "Christiansen", "Poulsen", "Johansen", "Møller", "Mortensen", "Østergaard",
    "Kjær", "Lund", "Holm", "Bech", "Dahl", "Skov", "Vestergaard", "Bak", "Krogh",
)
CITIES = (
    "København", "Aarhus", "Odense", "Aalborg", "Esbjerg", "Randers", "Kolding",
    "Horsens", "Vejle", "Roskilde", "Herning", "Helsingør", "Silkeborg", "Næstved",
    "Fredericia", "Viborg", "Køge", "Holstebro", "Taastrup", "Slagelse", "Hillerød",
    "Sønderborg", "Svendborg", "Hjørring", "Frederikshavn", "Nørresundby", "Ringsted",
    "Ølstykke", "Haderslev", "Skive", "Æbeltoft", "Rønne", "Tórshavn", "Nuuk",
)
PLANS = ("Basis", "Plus", "Premium", "Familie", "Student")
DOMAINS = ("example.com", "example.net", "example.org", "post.example", "mail.example")
# For the local part of an address (and the PDF's Latin-1 text): no non-ASCII letters.
ASCII_FOLD = str.maketrans({"æ": "ae", "ø": "oe", "å": "aa", "Æ": "Ae", "Ø": "Oe", "Å": "Aa"})
MERGE_FIELDS = ("first_name", "last_name", "city", "plan", "member_since")


def fake_subscribers(n: int, seed: int = 2007) -> Iterator[dict[str, str]]:
    """``n`` deterministic fake subscribers: unique email + the five MERGE_FIELDS."""
    rng = random.Random(seed)
    for i in range(n):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        local = f"{first}.{last}".lower().translate(ASCII_FOLD)
        yield {
            "email": f"{local}.{i}@{DOMAINS[i % len(DOMAINS)]}",
            "first_name": first, "last_name": last, "city": rng.choice(CITIES),
            "plan": rng.choice(PLANS),
            "member_since": f"{rng.randint(2005, 2024)}-{rng.randint(1, 12):02d}-"
                            f"{rng.randint(1, 28):02d}",
        }


def write_subscribers_csv(path: Path, n: int, seed: int = 2007) -> list[str]:
    """Write the CSV ``list import`` reads; the addresses, in order."""
    emails = []
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=("email", *MERGE_FIELDS))
        writer.writeheader()
        for row in fake_subscribers(n, seed):
            writer.writerow(row)
            emails.append(row["email"])
    return emails
