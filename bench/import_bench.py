"""CSV import speed: ``admin.import_csv`` (strict mode) for N subscribers.

    .venv/bin/python bench/import_bench.py [--subscribers 100000] [--profile] [--keep]

Writes a CSV of N subscribers with 5 merge fields (first_name, last_name,
city, plan, signup_date; Danish-ish values, some with æøå) into a temporary
directory, creates a list in a throw-away database and imports the file
three times: fresh (inserts), the same file again (re-import: every row hits
ON DUPLICATE KEY with unchanged values) and a changed file (every row's
`plan` and `city` differ: real updates). Prints seconds, rows/s and peak
RSS for each. Target (issue 2): a fresh import of 100,000 rows <= 10 s.

``--profile`` runs the fresh import under cProfile and prints the top
functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import pstats
import random
import tempfile
import unicodedata
from datetime import date, timedelta
from pathlib import Path

from common import Timer, bench_database, raw_connect, rss_line, server_line, table_bytes

from sendsystem import admin

FIRST = ("Anders", "Anne", "Bente", "Birgitte", "Christian", "Camilla", "Emil", "Freja",
         "Frederik", "Hanne", "Ida", "Jens", "Jesper", "Karen", "Kirsten", "Lars", "Lene",
         "Mads", "Mette", "Niels", "Nanna", "Ole", "Pernille", "Rasmus", "Signe", "Søren",
         "Trine", "Ulla", "Viggo", "Æsa", "Åse", "Bjørn", "Jørgen", "Mikkel", "Sofie")
LAST = ("Jensen", "Nielsen", "Hansen", "Pedersen", "Andersen", "Christensen", "Larsen",
        "Sørensen", "Rasmussen", "Jørgensen", "Petersen", "Madsen", "Kristensen", "Olsen",
        "Thomsen", "Christiansen", "Poulsen", "Johansen", "Møller", "Mortensen", "Østergaard",
        "Kjær", "Bækgaard", "Holm", "Dahl")
CITIES = ("København", "Aarhus", "Odense", "Aalborg", "Esbjerg", "Randers", "Kolding",
          "Horsens", "Vejle", "Roskilde", "Herning", "Hørsholm", "Helsingør", "Silkeborg",
          "Næstved", "Frederiksberg", "Viborg", "Køge", "Holstebro", "Taastrup", "Slagelse",
          "Hillerød", "Sønderborg", "Svendborg", "Ærøskøbing", "Rønne")
PLANS = ("gratis", "basis", "plus", "premium", "erhverv")
DOMAINS = ("gmail.com", "hotmail.com", "outlook.dk", "live.dk", "yahoo.dk", "mail.dk",
           "jubii.dk", "icloud.com", "tdcadsl.dk", "stofanet.dk", "firma.dk", "kommune.dk")
HEADER = ("email", "first_name", "last_name", "city", "plan", "signup_date")


def ascii_fold(text: str) -> str:
    """A plausible mailbox spelling of a Danish name: æ→ae, ø→oe, å→aa."""
    text = text.lower().replace("æ", "ae").replace("ø", "oe").replace("å", "aa")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def write_csv(path: Path, n: int, *, seed: int, changed: bool = False) -> None:
    """N rows with unique addresses; ``changed`` keeps the addresses, alters plan and city."""
    rng = random.Random(seed)
    start = date(2015, 1, 1)
    with path.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(HEADER)
        for i in range(n):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            city, plan = rng.choice(CITIES), rng.choice(PLANS)
            signup = start + timedelta(days=rng.randrange(3650))
            if changed:
                city, plan = CITIES[(CITIES.index(city) + 1) % len(CITIES)], \
                    PLANS[(PLANS.index(plan) + 1) % len(PLANS)]
            sep = rng.choice((".", "_", ""))
            email = f"{ascii_fold(first)}{sep}{ascii_fold(last)}{i}@{rng.choice(DOMAINS)}"
            out.writerow((email, first, last, city, plan, signup.isoformat()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the fresh import")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    n = args.subscribers

    with tempfile.TemporaryDirectory(prefix="sendsystem-bench-") as tmp, \
            bench_database(keep=args.keep) as (config, db):
        csv_path, changed_path = Path(tmp) / "subscribers.csv", Path(tmp) / "changed.csv"
        timer = Timer()
        with timer.section("generate"):
            write_csv(csv_path, n, seed=2007)
            write_csv(changed_path, n, seed=2007, changed=True)
        print(f"CSV: {n} rows, {csv_path.stat().st_size / 1e6:.1f} MB "
              f"(generated in {timer.seconds['generate']:.1f}s)")
        admin.create_list(db, "bench", "Nyhedsbrevet <nyheder@example.dk>")

        profiler = cProfile.Profile() if args.profile else None
        with timer.section("fresh"):
            if profiler:
                profiler.enable()
            result = admin.import_csv(db, "bench", csv_path)
            if profiler:
                profiler.disable()
        assert result.imported == n, result
        with timer.section("same"):
            admin.import_csv(db, "bench", csv_path)
        with timer.section("changed"):
            admin.import_csv(db, "bench", changed_path)

        for label, key in (("fresh import (inserts)", "fresh"),
                           ("re-import, same file", "same"),
                           ("re-import, changed fields", "changed")):
            secs = timer.seconds[key]
            print(f"{label:28s} {secs:7.2f} s  {n / secs:9,.0f} rows/s")
        conn = raw_connect(config.database.name)
        data, index, _ = table_bytes(conn, config.database.name, "subscribers")
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM subscribers")
            count = cur.fetchone()[0]  # type: ignore[index]
        print(f"subscribers: {count} rows, data {data / 1e6:.1f} MB + index {index / 1e6:.1f} MB"
              f" = {(data + index) / count:.0f} bytes/row")
        print(server_line(conn))
        conn.close()
        verdict = "OK" if timer.seconds["fresh"] <= 10 * n / 100_000 else "SLOWER THAN TARGET"
        print(f"target: 100,000 rows in <= 10 s -> {verdict}")
        print(rss_line())
        if profiler:
            stats = pstats.Stats(profiler).strip_dirs()
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
