"""Bounce classification held to flufl.bounce's own test corpus.

    .venv/bin/python bench/bounce_corpus.py [--cache DIR] [--show FILE] [--quiet]

Fetches the source distribution of the *installed* flufl.bounce with pip
(``pip download --no-binary :all: --no-deps flufl.bounce==<version>``) into a
cache directory (default ``~/.cache/sendsystem-bench``; nothing of the corpus is
copied into this repository), reads the expectations from its test suite and
runs :func:`sendsystem.bounce.classify.classify` (exactly what the bounce intake
calls, without a database) over every sample in ``tests/data/``.

What the test suite says, and how it is read here:

* ``tests/test_detectors.py``'s ``DETECTORS`` table lists per sample and
  detector the addresses that detector must report and whether they are
  temporary (delay warnings) or permanent failures. A sample listed by two
  detectors (groupwise_02: GroupWise finds nothing, Exchange finds the
  address) expects the union, as ``all_failures`` does.
* **Failure samples**: a non-empty expected set. Temporary when the table
  says so.
* **Negative samples**: the table expects no address, or another test in
  that file asserts that nothing is found (dumbass_01 in
  ``test_scan_unrecognized``).
* **Unscored**: a sample no test in that file names (bounce_01); shown,
  never counted.

Scores:

* **right address**: the addresses SendSystem would act on (the report's
  ``recipients``, for a verdict of hard, soft or blocked) equal the expected
  set, compared case-insensitively. Multi-recipient samples (a list server's
  envelope with several recipients at one domain: Yahoo, SMTP32, Netscape,
  sina) must yield *every* expected address and no other: SendSystem itself
  sends one recipient per envelope, so for its own mail each of these would
  be several bounces with one address each.
* **right hard/soft**: permanent ↔ ``hard``, temporary ↔ ``soft``. Every
  disagreement is printed with SendSystem's status and reason; the ones kept
  on purpose are explained in bench/README.md and match a rule of
  :mod:`sendsystem.smtpstatus`.
* **negatives left alone**: no verdict that counts against an address found
  in the sample (``hard`` or ``soft`` with recipients, or a complaint).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from email import message_from_bytes
from importlib.metadata import version
from pathlib import Path

from sendsystem.bounce.classify import BounceKind, BounceReport, classify
from sendsystem.smtpstatus import Cause, read_reply

PACKAGE = "flufl.bounce"
SECRET = b"bench-secret"
DOMAIN = "bounces.example.com"
FAILURE_KINDS = (BounceKind.HARD, BounceKind.SOFT, BounceKind.BLOCKED)
ACTING_KINDS = (BounceKind.HARD, BounceKind.SOFT, BounceKind.COMPLAINT)


@dataclass(frozen=True)
class Sample:
    name: str
    expected: frozenset[str]  # lower-cased addresses
    temporary: bool
    role: str  # "failure", "negative", "unscored"


@dataclass(frozen=True)
class Row:
    sample: Sample
    report: BounceReport
    flufl: frozenset[str]  # what flufl.bounce's all_failures() itself finds (lower-cased)

    @property
    def got(self) -> frozenset[str]:
        return frozenset(a.lower() for a in self.report.recipients)

    @property
    def right_address(self) -> bool:
        return self.report.kind in FAILURE_KINDS and self.got == self.sample.expected

    @property
    def right_severity(self) -> bool:
        want = BounceKind.SOFT if self.sample.temporary else BounceKind.HARD
        return self.report.kind is want

    @property
    def acted_on(self) -> bool:
        return self.report.kind in ACTING_KINDS and bool(self.report.recipients)


def fetch_corpus(cache: Path) -> Path:
    """The unpacked sdist of the installed flufl.bounce (downloaded once per version)."""
    ver = version(PACKAGE)
    root = cache / f"flufl_bounce-{ver}"
    if (root / "tests" / "test_detectors.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                    "--no-deps", f"{PACKAGE}=={ver}", "-d", str(cache)], check=True)
    sdists = sorted(cache.glob(f"flufl[._]bounce-{ver}.tar.gz"))
    if not sdists:
        raise SystemExit(f"pip did not leave a {PACKAGE} {ver} sdist in {cache}")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(cache, filter="data")
    if not (root / "tests" / "test_detectors.py").is_file():
        raise SystemExit(f"{root} has no tests/test_detectors.py: has the sdist layout changed?")
    return root


def _detectors_table(source: str) -> list[tuple[str, str, list[bytes], bool]]:
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "DETECTORS"):
            return list(ast.literal_eval(node.value))
    raise SystemExit("no DETECTORS table in tests/test_detectors.py")


def _names_outside_table(source: str) -> set[str]:
    """Sample files that test functions of test_detectors.py parse (``_parse('x.txt')``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "_parse" and node.args
                and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def samples(root: Path) -> list[Sample]:
    source = (root / "tests" / "test_detectors.py").read_text()
    expected: dict[str, set[str]] = {}
    temporary: dict[str, bool] = {}
    for _detector, name, addresses, is_temporary in _detectors_table(source):
        expected.setdefault(name, set()).update(a.decode().lower() for a in addresses)
        if addresses:
            temporary[name] = temporary.get(name, False) or is_temporary
    referenced = _names_outside_table(source)
    out = []
    for path in sorted((root / "tests" / "data").glob("*.txt")):
        name = path.name
        if name in expected:
            want = frozenset(expected[name])
            role = "failure" if want else "negative"
        elif name in referenced:
            # Outside the table only dumbass_01 (test_scan_unrecognized: nothing found).
            want, role = frozenset(), "negative"
        else:
            want, role = frozenset(), "unscored"
        out.append(Sample(name, want, temporary.get(name, False), role))
    return out


def _flufl(raw: bytes) -> frozenset[str]:
    from flufl.bounce import all_failures
    try:
        temp, perm = all_failures(message_from_bytes(raw))
    except Exception:
        return frozenset()
    return frozenset(a.decode("ascii", "replace").lower() for a in temp | perm)


def run(root: Path) -> list[Row]:
    rows = []
    for sample in samples(root):
        raw = (root / "tests" / "data" / sample.name).read_bytes()
        report = classify(raw, secret=SECRET, envelope_domain=DOMAIN)
        rows.append(Row(sample, report, _flufl(raw)))
    return rows


# Why SendSystem answers otherwise than flufl.bounce's permanent/temporary, by rule.
RULES = {
    Cause.FULL: "mailbox full is soft: it may empty (soft_limit removes a dead one)",
    Cause.SIZE: "message too big is soft: the mailbox exists",
    Cause.EXPIRED: "delivery expired (gave up retrying, or a final 4.x.x) is soft: "
                   "the mailbox may exist",
    Cause.POLICY: "a policy or spam block is about us: blocked, never counted",
}


def rule(row: Row) -> str:
    cause = read_reply(row.report.diagnostic, status=row.report.status).cause
    if cause is Cause.OTHER and (row.report.status or "").startswith("4."):
        cause = Cause.EXPIRED  # a final 4.x.x: the remote never refused, the sender gave up
    return RULES.get(cause, "NOT EXPLAINED")


def _fmt(addrs: Iterable[str]) -> str:
    return ", ".join(sorted(addrs)) or "-"


def _line(row: Row) -> str:
    r = row.report
    return f"{r.kind} {r.status or '-'} [{_fmt(row.got)}] {r.diagnostic[:110]}"


def report(rows: list[Row], quiet: bool) -> None:
    failures = [r for r in rows if r.sample.role == "failure"]
    negatives = [r for r in rows if r.sample.role == "negative"]
    unscored = [r for r in rows if r.sample.role == "unscored"]
    temp = sum(r.sample.temporary for r in failures)
    print(f"{PACKAGE} {version(PACKAGE)}: {len(rows)} samples = {len(failures)} failures "
          f"({len(failures) - temp} permanent, {temp} temporary) + {len(negatives)} negatives "
          f"+ {len(unscored)} unscored\n")

    right = [r for r in failures if r.right_address]
    severity = [r for r in failures if r.right_severity]
    alone = [r for r in negatives if not r.acted_on]
    flufl_right = [r for r in failures if r.flufl == r.sample.expected]
    print("| measure | SendSystem | flufl.bounce all_failures() |")
    print("|---|---:|---:|")
    print(f"| right address (failure samples) | {len(right)} / {len(failures)} | "
          f"{len(flufl_right)} / {len(failures)} |")
    print(f"| right hard/soft (failure samples) | {len(severity)} / {len(failures)} | – |")
    print(f"| negatives left alone | {len(alone)} / {len(negatives)} | "
          f"{sum(not r.flufl for r in negatives)} / {len(negatives)} |")

    print("\nWrong address:")
    for r in failures:
        if not r.right_address:
            print(f"  {r.sample.name}: expected [{_fmt(r.sample.expected)}], got {_line(r)}")
    print("\nHard/soft disagreements (flufl.bounce's permanent/temporary vs SendSystem), by rule:")
    disagree = [r for r in failures if not r.right_severity]
    for why in sorted({rule(r) for r in disagree}):
        these = [r for r in disagree if rule(r) == why]
        print(f"  {why}: {len(these)}")
        for r in these:
            want = "temporary" if r.sample.temporary else "permanent"
            print(f"    {r.sample.name}: {want} vs {_line(r)}")
    print("\nNegative samples:")
    for r in negatives:
        print(f"  {r.sample.name}: {'ACTED ON' if r.acted_on else 'left alone'}: {_line(r)}")
    for r in unscored:
        print(f"\nUnscored (no test names it): {r.sample.name}: {_line(r)}")
    if not quiet:
        print("\nEvery sample:")
        for r in rows:
            mark = ""
            if r.sample.role == "failure":
                mark = ("" if r.right_address else " ADDRESS") + (
                    "" if r.right_severity else " SEVERITY")
            print(f"  {r.sample.name:22} {r.sample.role:8} {_line(r)}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sendsystem-bench",
                        help="where the sdist is downloaded and unpacked (reused)")
    parser.add_argument("--show", metavar="FILE", help="print one sample's full report")
    parser.add_argument("--quiet", action="store_true", help="no per-sample listing")
    args = parser.parse_args()
    root = fetch_corpus(args.cache)
    if args.show:
        raw = (root / "tests" / "data" / args.show).read_bytes()
        print(classify(raw, secret=SECRET, envelope_domain=DOMAIN))
        return
    report(run(root), args.quiet)


if __name__ == "__main__":
    main()
