"""`list import` and `list export` of N subscribers: time, rows/s, peak RSS.

    .venv/bin/python bench/import_bench.py [--subscribers 1000000] [--no-reimport]
        [--no-refusal] [--no-export] [--no-roundtrip] [--profile] [--keep] [--work DIR]

Writes a CSV of N subscribers with 5 merge fields (first_name, last_name,
city, plan, signup_date; Danish-ish values, some with æøå) into a temporary
directory (``--work``: where; it needs about 5 times the CSV's size: the
CSV, the changed CSV, the import's sort runs, the export), creates a list
in a throw-away database and runs the real command line, each step a
`python -m sendsystem` subprocess whose peak RSS is its own (wait4):

1. fresh import (inserts), with its phases (read, check, write) from the log;
2. the same file again (every row hits ON DUPLICATE KEY, nothing changes)
   and a changed file (every row's plan and city differ: real updates),
   unless ``--no-reimport``;
3. a strict import of the file plus one bad last line, refused (the time
   to say no, and nothing written), unless ``--no-refusal``;
4. `list export` of the list to a file, and an import of that file into a
   new list (the round trip; both lists must then export the same bytes),
   unless ``--no-export`` (``--no-roundtrip``: the export only).

Targets (issue 15): 10,000,000 rows imported in <= 5 min and < 150 MB RSS.
``--profile`` runs a fresh import in this process under cProfile instead.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import os
import pstats
import random
import re
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from common import bench_database, raw_connect, rss_line, server_line, table_bytes

from sendsystem import admin
from sendsystem.config import Config
from sendsystem.demo.settings import write_config

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
PHASES_RE = re.compile(r"read ([\d.]+) s, check ([\d.]+) s, write ([\d.]+) s")


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


@dataclass
class Step:
    """One `python -m sendsystem` run: wall time, exit code, peak RSS, output."""

    seconds: float
    code: int
    rss_mb: float
    output: str


def sendsystem(config_path: Path, *args: str) -> Step:
    argv = [sys.executable, "-m", "sendsystem", "--config", str(config_path), *args]
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        out.seek(0)
        return Step(seconds, os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024,
                    out.read().decode(errors="replace"))


def report(label: str, step: Step, rows: int, ok: bool = True) -> None:
    phases = PHASES_RE.search(step.output)
    detail = f"  (read {phases[1]} s, check {phases[2]} s, write {phases[3]} s)" if phases else ""
    print(f"{label:34s} {step.seconds:8.1f} s {rows / step.seconds:9,.0f} rows/s "
          f"{step.rss_mb:6.0f} MB RSS{detail}", flush=True)
    if not ok:
        print(step.output[-3000:])
        sys.exit(f"{label}: unexpected outcome (exit {step.code})")


def count(config: Config, list_name: str) -> int:
    conn = raw_connect(config.database.name)
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM subscribers s JOIN lists l ON l.id = s.list_id "
                    "WHERE l.name = %s", (list_name,))
        n = int(cur.fetchone()[0])  # type: ignore[index]
    conn.close()
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--no-reimport", action="store_true")
    parser.add_argument("--no-refusal", action="store_true")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--no-roundtrip", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile a fresh import")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    parser.add_argument("--work", type=Path, help="directory for the files (default TMPDIR)")
    args = parser.parse_args()
    n = args.subscribers

    with tempfile.TemporaryDirectory(prefix="sendsystem-bench-", dir=args.work) as tmp, \
            bench_database(keep=args.keep) as (config, db):
        work = Path(tmp)
        os.environ["TMPDIR"] = str(work)  # the commands' sort runs and spools go there too
        csv_path = work / "subscribers.csv"
        started = time.monotonic()
        write_csv(csv_path, n, seed=2007)
        print(f"CSV: {n:,} rows, {csv_path.stat().st_size / 1e6:.1f} MB (generated in "
              f"{time.monotonic() - started:.1f} s)", flush=True)
        admin.create_list(db, "bench", "Nyhedsbrevet <nyheder@example.dk>")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            result = admin.import_csv(db, "bench", csv_path)
            profiler.disable()
            print(f"fresh import {result.seconds}; {rss_line()}")
            stats = pstats.Stats(profiler).strip_dirs()
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(20)
            return
        s = config.database
        config_path = write_config(work / "config.ini", {"database": {
            "host": s.host, "port": s.port, "user": s.user, "password": s.password,
            "name": s.name}})

        step = sendsystem(config_path, "list", "import", "bench", str(csv_path))
        report("fresh import (inserts)", step, n, step.code == 0 and count(config, "bench") == n)
        if not args.no_reimport:
            step = sendsystem(config_path, "list", "import", "bench", str(csv_path))
            report("re-import, same file", step, n, step.code == 0)
            changed = work / "changed.csv"
            write_csv(changed, n, seed=2007, changed=True)
            step = sendsystem(config_path, "list", "import", "bench", str(changed))
            report("re-import, changed fields", step, n, step.code == 0)
            changed.unlink()
        if not args.no_refusal:
            with csv_path.open("a", encoding="utf-8") as fh:
                fh.write("not-an-address,Bo,Bo,Odense,plus,2020-01-01\n")
            admin.create_list(db, "refused", "R <r@example.dk>")
            step = sendsystem(config_path, "list", "import", "refused", str(csv_path))
            ok = step.code == 1 and count(config, "refused") == 0 and \
                f"line {n + 2}: 'not-an-address'" in step.output
            report("strict import, bad last line", step, n + 1, ok)
        if not args.no_export:
            out = work / "export.csv"
            step = sendsystem(config_path, "list", "export", "bench", str(out))
            report("export", step, n, step.code == 0)
            print(f"  export file: {out.stat().st_size / 1e6:.1f} MB", flush=True)
            csv_path.unlink()
        if not args.no_export and not args.no_roundtrip:
            admin.create_list(db, "copy", "Kopi <kopi@example.dk>")
            step = sendsystem(config_path, "list", "import", "copy", str(out))
            report("import of the export (new list)", step, n,
                   step.code == 0 and count(config, "copy") == n)
            again = work / "again.csv"
            step = sendsystem(config_path, "list", "export", "copy", str(again))
            same = out.read_bytes() == again.read_bytes()
            print(f"round trip: the copy exports the same bytes: {same}", flush=True)
            if not same:
                sys.exit("round trip failed")

        conn = raw_connect(config.database.name)
        data, index, _ = table_bytes(conn, config.database.name, "subscribers")
        print(f"subscribers: data {data / 1e6:.1f} MB + index {index / 1e6:.1f} MB")
        print(server_line(conn))
        conn.close()


if __name__ == "__main__":
    main()
